"""One backbone, one head per task, trained on images that carry only some of the labels (2MD-MTL), and the
data distillation that fills the missing ones with the model's own confident answers.

Rows are the union of every dataset's images (the same file named by two tasks, e.g. UTKFace's age,
gender and ethnicity, is one row). Each Target holds its labels over all rows with a mask of the rows
that have one. A batch mixes datasets; each target's loss is taken over the rows of the batch that
carry its label, and is divided by the loss of the best constant predictor on its training labels
(the class prior's entropy, the mean absolute deviation from the median, ...), so every task starts
near 1 whatever its units and none dominates by scale. A target with no label in a batch adds nothing
(no NaN, no division by zero). The same machinery trains the distillation term of `kd`: a target
whose labels are a teacher's outputs.

Augmentations move the canonical crop (zoom, rotation, shift, mirror) through its alignment matrix, so
landmark labels follow the pixels exactly (common.landmarks).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torchvision.transforms import v2

from . import landmarks as lm
from . import metrics, tasks
from .align import CANON
from .align import warp
from .facedata import Batches
from .progress import Progress
from .runs import leave_stops_to_the_parent
from .student import head

KINDS = ("classification", "regression", "multilabel", "landmarks", "embedding")


# ----------------------------------------------------------------------------------------------- rows
class Rows:
    """The union of several tasks' images: row -> (file, alignment matrix, face found, where its crop is in the
    crop store), deduplicated by real path. Pixels come from the task caches' crop stores, never from the files."""

    def __init__(self):
        self.paths, self.matrices, self.found, self.crops, self.index = [], [], [], [], {}

    def add(self, cache, data) -> np.ndarray:
        """Rows of a task's samples (in sample order), taking the faces from its cache (one row per sample)."""
        out = np.empty(len(data.samples), np.int64)
        found, matrices = cache.found, cache.matrices
        for i, s in enumerate(data.samples):
            # the real path: the same file reached through a relative path, a link or "..", as a pseudo-label
            # folder may name a task's test images, must be one row, which the held-out rules then keep out
            key = os.path.realpath(str(s.path))
            if key not in self.index:
                self.index[key] = len(self.paths)
                self.paths.append(str(s.path))
                self.matrices.append(np.asarray(matrices[i], np.float64))
                self.found.append(bool(found[i]))
                self.crops.append((cache, i))
            out[i] = self.index[key]
        return out

    def canonical_view(self, row: int, view: np.ndarray) -> np.ndarray:
        """The CANON x CANON view (a matrix in canonical-crop coordinates) of a row's face, from its stored crop."""
        cache, i = self.crops[row]
        crop = cache.crops.take(np.array([i]))[0]
        k = CANON / cache.crop_size  # store pixel centres -> canonical pixel centres (area shrink by k)
        from_store = np.array([[k, 0.0, (k - 1) / 2], [0.0, k, (k - 1) / 2]])
        return warp(crop, lm.compose(view, from_store), CANON)

    def __len__(self):
        return len(self.paths)

    def matrix(self, rows) -> np.ndarray:
        return np.stack([self.matrices[r] for r in np.asarray(rows)])


class Faces(torch.utils.data.Dataset):
    """(uint8 pixels, row, view matrix, mirrored) of given rows; a training view is drawn from (seed, epoch, row)."""

    def __init__(self, rows: Rows, ids, size: int, train: bool, seed: int = 0, view=None):
        self.rows, self.ids, self.size, self.train, self.seed = rows, np.asarray(ids, np.int64), size, train, seed
        self.view = view if view is not None else (lm.about_centre(), False)
        self.epoch = 0
        self.resize = v2.Resize((size, size), antialias=True)
        # Pixel-only changes here; the geometric ones are in the view matrix.
        self.jitter = v2.Compose([v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.2), v2.RandomGrayscale(0.05)])

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        row = int(self.ids[i])
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, row])
            m, flipped = lm.random_view(rng)
        else:
            m, flipped = self.view
        view = self.rows.canonical_view(row, m)
        pixels = self.resize(torch.from_numpy(np.ascontiguousarray(view)).permute(2, 0, 1))
        if self.train:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(rng.integers(2 ** 31)))
                pixels = self.jitter(pixels)
        return pixels.contiguous(), row, torch.as_tensor(m, dtype=torch.float64), flipped


# -------------------------------------------------------------------------------------------- targets
@dataclass
class Target:
    """One output of the joint model and its labels over all rows.

    Labels are in network units: class indices, regression values scaled to [0, 1] over lo_hi, {0, 1}
    attributes, landmark points as fractions of the canonical crop, teacher embeddings. `on` names
    another target whose output this one's loss reads (through `select`, a (5, K) point map): the kd
    term of a landmark task compares the task's own points with the teacher's.
    """
    name: str
    kind: str
    n_out: int
    y: torch.Tensor
    mask: torch.Tensor
    task: object = None  # the tasks.Task whose protocol and metric score this target (None: a training term only)
    lo_hi: tuple | None = None
    weight: float = 1.0
    scale: float = 1.0
    on: str | None = None
    select: torch.Tensor | None = None
    pseudo: torch.Tensor | None = None  # rows whose label came from data distillation
    init: torch.Tensor | None = None  # where a regression or landmark head's output starts: the training median
    split: object = None  # the task's tasks.Split (positions in its samples; extra["sample_rows"] gives their rows)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"target {self.name}: unknown kind {self.kind!r}")
        if self.pseudo is None:
            self.pseudo = torch.zeros(len(self.mask), dtype=torch.bool)

    def fit_scale(self, rows) -> None:
        """The loss of the best constant prediction on these rows' labels: the unit every loss is divided by."""
        y = self.y[torch.as_tensor(rows)]
        if len(y) == 0:
            raise ValueError(f"target {self.name}: no training label")
        if self.kind == "classification":
            p = torch.bincount(y, minlength=self.n_out).double() / len(y)
            s = float(-(p[p > 0] * p[p > 0].log()).sum())
        elif self.kind == "multilabel":
            p = y.double().mean(0).clamp(1e-6, 1 - 1e-6)
            s = float((-(p * p.log() + (1 - p) * (1 - p).log())).mean())
        elif self.kind == "embedding":
            s = float((1 - F.cosine_similarity(y.double(), y.double().mean(0, keepdim=True))).mean())
        else:  # regression, landmarks: L1 of the median, where their heads start (JointModel)
            y = y.double().reshape(len(y), -1)
            self.init = y.median(0).values.float()
            s = float((y - self.init).abs().mean())
        # A task whose training labels are all one value has nothing to learn: keep its loss in plain units.
        self.scale = s if s > 1e-6 else 1.0


def label_rows(target: Target) -> np.ndarray:
    return np.flatnonzero(target.mask.numpy())


def task_target(task, data, ids: np.ndarray, rows: Rows, n_rows: int, split) -> Target:
    """A task's labels placed on the union's rows; only the split's training rows are unmasked."""
    n_out = tasks.output_size(task, data)
    labels = [s.label for s in data.samples]
    lo_hi = None
    if task.kind == "regression":
        v = np.asarray(labels, np.float64)
        lo_hi = task.label_range or tasks.label_range_seen(task, data, v)  # never from a test label
        values = torch.tensor((v - lo_hi[0]) / max(lo_hi[1] - lo_hi[0], 1e-9), dtype=torch.float32)
        y = torch.zeros(n_rows)
    elif task.kind == "landmarks":
        pts = np.stack(labels)
        values = torch.tensor(lm.to_crop(pts, rows.matrix(ids)), dtype=torch.float32)
        y = torch.zeros(n_rows, *pts.shape[1:])
    elif task.kind == "multilabel":
        values = torch.tensor(np.asarray(labels, np.float32))
        y = torch.zeros(n_rows, values.shape[1])
    elif task.kind == "classification":
        values = torch.tensor(np.asarray(labels, np.int64))
        y = torch.zeros(n_rows, dtype=torch.int64)
    else:
        raise SystemExit(f"error: {task.name}: a {task.kind} task has no per-image label to train a head on")
    y[torch.as_tensor(ids)] = values
    mask = torch.zeros(n_rows, dtype=torch.bool)
    found = np.asarray(rows.found)
    train = ids[split.train][found[ids[split.train]]]
    mask[torch.as_tensor(train)] = True
    t = Target(task.name, "landmarks" if task.kind == "landmarks" else task.kind, n_out, y, mask, task=task,
               lo_hi=lo_hi, split=split, extra={"labels": labels, "sample_rows": ids})
    if task.kind == "landmarks":
        t.extra["mean_shape"] = np.mean([labels[i] for i in split.train], 0)
    t.fit_scale(train)
    return t


def hold_out(targets: list[Target], held: np.ndarray, log=None) -> None:
    """An image that some task tests or validates on is never trained on, for any task (UTKFace's tasks share
    one split; a user's tasks may not): its labels leave every mask, and the loss unit and a head's start are
    fitted again on the labels that remain."""
    for t in targets:
        leak = t.mask[torch.as_tensor(held)].clone()
        t.mask[torch.as_tensor(held)] = False
        if leak.any():
            if log:
                log.info(f"multitask {t.name}: {int(leak.sum())} training images are another task's "
                         "test/validation images and are left out")
            if t.mask.any():
                t.fit_scale(label_rows(t))


# ------------------------------------------------------------------------------------------ the model
def build_backbone(name: str, student_path, device) -> tuple[nn.Module, int, int]:
    """(backbone, embedding width, input side): `student` (the distilled checkpoint), `scratch` (its
    architecture from random init) or the name of a PyTorch teacher of the registry."""
    from .student import DEFAULT, load_student, read_checkpoint, student_file, student_like
    from .teachers import TeacherBackbone, build_teachers

    if name == "scratch" and not student_file(student_path).is_file():
        return student_like(DEFAULT), DEFAULT["out_dim"], DEFAULT["size"]  # no student: the default architecture
    if name in ("student", "scratch"):
        cfg = read_checkpoint(student_path)[0]
        net = load_student(student_path)[0] if name == "student" else student_like(cfg)
        return net, cfg["out_dim"], cfg.get("size", 112)
    if why := backbone_problem(name):
        raise SystemExit(f"error: {why}")
    t = build_teachers([name], device)[0]
    return TeacherBackbone(t), t.dim, CANON


class JointModel(nn.Module):
    """Backbone + one MLP head per target that has its own output (targets with `on` read another's)."""

    def __init__(self, backbone: nn.Module, width: int, targets: list[Target], hidden: int):
        super().__init__()
        self.backbone = backbone
        self.names = [t.name for t in targets if t.on is None]
        self.heads = nn.ModuleList([head(width, t.n_out, hidden) if t.kind != "embedding" else nn.Linear(width, t.n_out)
                                    for t in targets if t.on is None])
        for mod, t in zip(self.heads, [t for t in targets if t.on is None]):
            if t.init is not None:  # start at the constant predictor: points on the mean face, not in a corner
                with torch.no_grad():
                    mod[-1].bias.copy_(t.init)

    def forward(self, x) -> dict:
        h = self.backbone(x)
        out = {n: mod(h) for n, mod in zip(self.names, self.heads)}
        out["_embedding"] = h
        return out


# ----------------------------------------------------------------------------------------------- loss
def batch_labels(t: Target, rows, views, flipped) -> torch.Tensor:
    """The target's labels of these rows as this batch's views see them (landmarks move and swap)."""
    y = t.y[rows]
    if t.kind != "landmarks":
        return y
    p = y.double().numpy() * CANON
    out = np.stack([lm.view_points(p[i], views[i].numpy(), bool(flipped[i])) for i in range(len(p))]) / CANON
    return torch.as_tensor(out, dtype=torch.float32)


def output_of(t: Target, out: dict) -> torch.Tensor:
    o = out[t.on or t.name]
    if t.kind == "landmarks":
        o = o.view(len(o), -1, 2)
        if t.select is not None:
            o = torch.einsum("fk,nkc->nfc", t.select.to(o), o)
    return o


def target_loss(t: Target, o: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if t.kind == "classification":
        return F.cross_entropy(o, y)
    if t.kind == "multilabel":
        return F.binary_cross_entropy_with_logits(o, y)
    if t.kind == "embedding":
        return (1 - F.cosine_similarity(o, y, dim=1)).mean()
    return F.l1_loss(o.reshape(y.shape), y)


def joint_loss(targets: list[Target], out: dict, rows, views, flipped) -> tuple[torch.Tensor | None, dict]:
    """Sum over targets of weight x (masked loss / constant-predictor loss); targets without a label here add
    nothing. Returns (the sum, {target: its detached loss}), or (None, {}) for a batch where no target has a
    label."""
    total, parts = None, {}
    for t in targets:
        keep = t.mask[rows]
        if not keep.any():
            continue
        sel = torch.nonzero(keep).flatten()
        device = out["_embedding"].device
        y = batch_labels(t, rows[sel], views[sel], flipped[sel]).to(device, non_blocking=True)
        loss = target_loss(t, output_of(t, out)[sel.to(device, non_blocking=True)], y) / t.scale
        parts[t.name] = loss.detach()  # a tensor: float() here would make the host wait every step
        total = t.weight * loss if total is None else total + t.weight * loss
    return total, parts


# ------------------------------------------------------------------------------------ train, predict
def loader(rows: Rows, ids, size, train, args, seed=0, view=None):
    """(dataset, DataLoader); the training order is a function of (seed, epoch) alone (Batches, set_epoch), as in
    transfer.py's fine-tuning, whatever the number of workers, and a last batch of one image joins the one before."""
    ds = Faces(rows, ids, size, train, seed, view)
    dl = torch.utils.data.DataLoader(ds, batch_sampler=Batches(len(ids), args.batch, train, seed),
                                     num_workers=args.workers, pin_memory=torch.cuda.is_available(),
                                     generator=torch.Generator(), worker_init_fn=leave_stops_to_the_parent)
    return ds, dl


def train(model, targets: list[Target], rows: Rows, size, epochs, lr_groups, args, device, validate=None,
          desc="multitask", start_epoch=0, best=None, frozen=False) -> dict:
    """Adam on the joint loss over every row with at least one label; batches mix datasets.

    validate(model) -> {task name: score} after each epoch; for each task the weights of its best epoch are
    kept (tasks may peak at different epochs). Returns {task name: (score, state, epoch counted from 1 over
    every round)}, empty without validate;
    `best` carries such a record over from earlier epochs. frozen: the backbone (and its batch statistics) stays.
    """
    ids = np.unique(np.concatenate([label_rows(t) for t in targets]))
    ds, dl = loader(rows, ids, size, True, args, seed=args.seed)
    opt = torch.optim.Adam(lr_groups)
    best = dict(best or {})
    bar = Progress(desc, total=epochs * len(ids))
    for epoch in range(epochs):
        ds.epoch = start_epoch + epoch
        dl.batch_sampler.set_epoch(ds.epoch)
        model.train()
        if frozen:
            model.backbone.eval()
        finite = True  # a device flag, read once an epoch: a check each step would make the host wait
        for x, r, v, f in dl:
            if len(x) < 2:  # a training set of one image (Batches merges a lone last one): batch norm cannot train on it
                continue
            loss, _ = joint_loss(targets, model(x.to(device, non_blocking=True)), r, v, f)
            if loss is None:
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            finite = torch.isfinite(loss.detach()) & finite
            bar.update(len(x), epoch=f"{start_epoch + epoch + 1}")
        if not bool(finite):
            raise FloatingPointError(f"{desc}: the loss became inf or NaN in epoch {start_epoch + epoch + 1}; "
                                     "lower --lr")
        if validate is not None:
            keep_best(best, validate(model), targets, model, ds.epoch + 1)
    bar.close()
    model.eval()
    return best


def keep_best(best: dict, scores: dict, targets, model, epoch: int) -> None:
    """For each task scored, this epoch's weights when its validation score beats the best one so far."""
    for name, s in scores.items():
        if name not in best or metrics.better(name_metric(targets, name), s, best[name][0]):
            best[name] = (s, {k: v.detach().clone() for k, v in model.state_dict().items()}, epoch)


def name_metric(targets, name) -> str:
    return next(t.task.metric for t in targets if t.name == name)


TTA_VIEWS = [(lm.about_centre(s), False) for s in (1.0, 0.9, 1.1)]
TTA_VIEWS += [(lm.compose(m, lm.mirror()), True) for m, _ in TTA_VIEWS]


@torch.no_grad()
def predict(model, targets: list[Target], rows: Rows, ids, size, args, device, views=None) -> dict:
    """{target name: (n, ...) network-unit predictions} for these rows, averaged over views (default: the
    plain crop): class probabilities, regression values, landmark points brought back from each view; with
    several views also {name + ':spread': per-row disagreement} (std of values or points, in network units)."""
    model.eval()
    views = views or [(lm.about_centre(), False)]
    per_view = {t.name: [] for t in targets if t.on is None and t.kind != "embedding"}
    for view in views:
        _, dl = loader(rows, ids, size, False, args, view=view)
        outs = {n: [] for n in per_view}
        for x, *_ in dl:
            out = model(x.to(device))
            for t in targets:
                if t.name in outs:
                    outs[t.name].append(output_of(t, out).float().cpu())
        for t in targets:
            if t.name not in outs:
                continue
            o = torch.cat(outs[t.name]) if outs[t.name] else torch.zeros(0, t.n_out)
            if t.kind == "classification":
                o = o.softmax(1)
            elif t.kind == "multilabel":
                o = o.sigmoid()
            elif t.kind == "landmarks":  # back from the view to the plain crop
                m, flipped = view
                inv = lm.invert(m)
                p = lm.apply(inv, o.double().numpy() * CANON)
                if flipped:
                    p = p[:, lm.FLIP[p.shape[1]]]
                o = torch.as_tensor(p / CANON, dtype=torch.float32)
            per_view[t.name].append(o)
    res = {}
    for name, vs in per_view.items():
        s = torch.stack(vs)
        res[name] = s.mean(0)
        if len(vs) > 1:
            res[name + ":spread"] = s.std(0).reshape(len(ids), -1).mean(1)
    return res


@torch.no_grad()
def embeddings(model, rows: Rows, ids, size, args, device) -> torch.Tensor:
    """The backbone's embedding of these rows (rows without a face are the caller's to mask)."""
    model.eval()
    _, dl = loader(rows, ids, size, False, args)
    parts = [model.backbone(x.to(device)).float().cpu() for x, *_ in dl]
    return torch.cat(parts) if parts else torch.zeros(0)


# -------------------------------------------------------------------------------------------- scoring
def decode(t: Target, o: torch.Tensor, ids, rows: Rows) -> np.ndarray:
    """Network-unit predictions -> the task's units (class, years, attribute decisions, image pixels)."""
    o = o.numpy()
    if t.kind == "regression":  # held inside the label range, as transfer.py's other methods
        return np.clip(o[:, 0], 0, 1) * (t.lo_hi[1] - t.lo_hi[0]) + t.lo_hi[0]
    if t.kind == "multilabel":
        return np.where(np.isnan(o), np.nan, o > 0.5)  # NaN: counted wrong, as a missed face's
    if t.kind == "landmarks":
        return lm.from_crop(o, rows.matrix(ids))
    return metrics.class_indices(o)


def score_rows(t: Target, model, rows: Rows, sample_idx, size, args, device) -> tuple[float, np.ndarray]:
    """The task's metric on these samples (indices into its TaskData), with the missed-face rule."""
    ids = t.extra["sample_rows"][sample_idx]
    found = np.asarray(rows.found)[ids]
    y_true = np.asarray([t.extra["labels"][i] for i in sample_idx])
    if t.kind == "landmarks":
        # A missed face predicts the mean training shape (image pixels): the landmark form of section 4.1's rule.
        preds = np.repeat(t.extra["mean_shape"][None], len(ids), 0)
    else:
        preds = np.zeros(y_true.shape)
    if found.any():
        preds[found] = decode(t, predict(model, [t], rows, ids[found], size, args, device)[t.name], ids[found], rows)
    if t.kind != "landmarks":
        preds = tasks.missed_face_rule(t.task, preds, ~found, t.lo_hi)
    return metrics.METRICS[t.task.metric](preds, y_true), preds


def validator(targets, rows, size, args, device):
    """validate(model) -> {task: validation score} for the targets whose protocol has a validation split."""
    scored = [t for t in targets if t.task is not None and t.split.val is not None and len(t.split.val)]

    def validate(model):
        res = {}
        for t in scored:
            res[t.name] = score_rows(t, model, rows, t.split.val, size, args, device)[0]
        return res
    return validate if scored else None


# ------------------------------------------------------------------------------------ data distillation
def beats_a_constant(t: Target, model, rows: Rows, size, args, device) -> tuple[float, float] | None:
    """(the model's, a constant's) validation error of a regression or landmark task: the training labels'
    median value or mean shape, the best guess that knows no face. None without a validation split. A head
    still near its constant answers every face alike, and so agrees with itself over the views: the spread
    rule alone kept most of its answers (age: 134 of 192, their spread a quarter of the real labels')."""
    if t.task is None or t.kind not in ("regression", "landmarks") or t.split.val is None or not len(t.split.val):
        return None
    mine, _ = score_rows(t, model, rows, t.split.val, size, args, device)
    y_true = np.asarray([t.extra["labels"][i] for i in t.split.val])
    seen = np.asarray([t.extra["labels"][i] for i in t.split.train])
    constant = seen.mean(0) if t.kind == "landmarks" else np.median(seen)
    return mine, metrics.METRICS[t.task.metric](np.repeat(np.asarray(constant)[None], len(y_true), 0), y_true)


def pseudo_label(model, states: dict, targets: list[Target], rows: Rows, candidates: np.ndarray, size, args, device,
                 threshold: float, agreement: float, log=None) -> dict:
    """Label candidate rows for the tasks they lack with the model's answers averaged over flips and scales.

    states[task name] holds the weights that label that task (its best validation epoch); tasks sharing
    weights are labelled in one pass. A classification label is kept when its mean probability reaches
    `threshold`; a regression value or landmark shape when its spread over the views (std, in [0, 1] units of
    the label range / of the crop) is at most `agreement`, if its model's validation error beats a constant's
    (beats_a_constant); a regression value is clipped to the label range. Attribute (multilabel) tasks are
    not pseudo-labelled. Real labels are never replaced. Returns {task: rows added}.
    """
    found = np.asarray(rows.found)
    todo = {t.name: np.array([r for r in candidates if found[r] and not t.mask[r]], np.int64) for t in targets
            if t.on is None and t.kind not in ("multilabel", "embedding")}
    groups = {}
    for t in targets:
        if t.name in todo:
            groups.setdefault(id(states[t.name]), []).append(t)
    added = {}
    for group in groups.values():
        ids = np.unique(np.concatenate([todo[t.name] for t in group]))
        if not len(ids):
            added.update({t.name: 0 for t in group})
            continue
        model.load_state_dict(states[group[0].name])
        p = predict(model, group, rows, ids, size, args, device, views=TTA_VIEWS)
        for t in group:
            at = np.searchsorted(ids, todo[t.name])
            o, spread = p[t.name][at], p[t.name + ":spread"][at]
            if t.kind == "classification":
                conf, y = o.max(1)
                keep = conf >= threshold
            else:
                keep, y = spread <= agreement, (o[:, 0].clamp(0, 1) if t.kind == "regression" else o)
                if (errors := beats_a_constant(t, model, rows, size, args, device)) and errors[0] >= errors[1]:
                    keep[:] = False
                    if log:
                        log.info(f"pseudo-labels {t.name}: none kept: on validation its answers (error "
                                 f"{errors[0]:.4f}) do not beat the training labels' constant ({errors[1]:.4f})")
            sel = torch.as_tensor(todo[t.name])[keep]
            t.y[sel] = y[keep].to(t.y.dtype)
            t.mask[sel] = True
            t.pseudo[sel] = True
            added[t.name] = int(keep.sum())
            if log:
                log.info(f"pseudo-labels {t.name}: {added[t.name]} of {len(todo[t.name])} candidate faces kept")
    return added


# ------------------------------------------------------------------------------------------ 2MD-MTL
def lr_groups(model: JointModel, args, scratch: bool, frozen: bool = False) -> list[dict]:
    # A pretrained backbone moves slower than the new heads; from scratch, both move at the heads' pace.
    heads = [{"params": model.heads.parameters(), "lr": args.lr}]
    if frozen:
        return heads
    return [{"params": model.backbone.parameters(), "lr": args.lr if scratch else args.lr / 10}] + heads


def evaluate(model, targets, rows, size, args, device, best: dict) -> dict:
    """Each task's test score, with the weights of its best validation epoch (the last epoch without one): each
    task's own checkpoint, so the tasks' scores may come from different epochs of the joint model."""
    final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    res = {}
    for t in targets:
        if t.task is None:
            continue
        val, state, epoch = best.get(t.name, (None, final, None))
        model.load_state_dict(state)
        value, _ = score_rows(t, model, rows, t.split.test, size, args, device)
        test_rows = t.extra["sample_rows"][t.split.test]
        res[t.name] = {"metric": t.task.metric, "value": float(value), "val": None if val is None else float(val),
                       "chosen": None if epoch is None else f"epoch {epoch}", "epoch": epoch, "n_test": len(test_rows),
                       "missed_test": int((~np.asarray(rows.found)[test_rows]).sum()),
                       "selection": t.extra.get("selection", "no choice made: the last epoch")}
    model.load_state_dict(final)
    return res


def task_problem(task, data) -> str | None:
    """Why a task cannot join the multitask model (None: it can); asked of every task before any work."""
    if task.kind == "verification":
        return f"multitask: {task.name} is a verification task (pairs, no per-image label)"
    if len(data.splits) != 1:
        return (f"multitask: {task.name}'s protocol has {len(data.splits)} splits (leave-one-out); one joint model "
                "serves tasks with a single train/test split")
    return None


def backbone_problem(name: str) -> str | None:
    """Why --backbone `name` cannot be the multitask backbone (None: it can), without building it."""
    from .teachers import REGISTRY

    if name in ("student", "scratch") or (name in REGISTRY and REGISTRY[name].runtime == "torch"):
        return None
    torch_names = sorted(n for n, s in REGISTRY.items() if s.runtime == "torch")
    return f"backbone {name!r}: use student, scratch or a PyTorch teacher ({', '.join(torch_names)})"


def run_joint(jobs, args, device, log, unlabelled=None) -> dict:
    """2MD-MTL: one model for every (task, data, cache) of jobs; with unlabelled=(data, cache), data distillation.

    Returns {task name: {"multitask": entry[, "multitask+pseudo": entry]}}. With data distillation both
    entries start from the same first round of --epochs; then "multitask" trains --pseudo-epochs more on the
    labels alone and "multitask+pseudo" as many on labels + pseudo-labels, so the two differ by the
    pseudo-labels only.
    """
    for task, data, _ in jobs:
        if why := task_problem(task, data):
            raise SystemExit(f"error: {why}")
    rows = Rows()
    ids = [rows.add(cache, data) for _, data, cache in jobs]
    un_ids = rows.add(unlabelled[1], unlabelled[0]) if unlabelled else np.zeros(0, np.int64)
    # Every choice (here each task's epoch) is made on validation images: a protocol without a validation
    # split gets one carved from its training part, as the other methods of transfer.py do.
    carved = [tasks.with_validation(data.splits[0], 0, None, args.seed, args.val_frac) for _, data, _ in jobs]
    splits = [s for s, _ in carved]
    targets = [task_target(task, data, i, rows, len(rows), s) for (task, data, _), i, s in zip(jobs, ids, splits)]
    for t, (_, how) in zip(targets, carved):
        t.extra["selection"] = how
    held = np.unique(np.concatenate([i[p] for sp, i in zip(splits, ids) for p in (sp.test, sp.val)]))
    hold_out(targets, held, log)
    names = ", ".join(f"{t.name} ({int(t.mask.sum())} labels)" for t in targets)
    log.info(f"multitask: {len(rows)} images, {len(targets)} tasks: {names}")
    torch.manual_seed(args.seed)  # before the backbone: scratch's weights are drawn there
    backbone, width, size = build_backbone(args.backbone, args.student, device)
    model = JointModel(backbone, width, targets, args.hidden).to(device)
    groups = lambda: lr_groups(model, args, args.backbone == "scratch")  # noqa: E731
    validate = validator(targets, rows, size, args, device)
    best = train(model, targets, rows, size, args.epochs, groups(), args, device, validate, desc="multitask")
    if not unlabelled:
        return {name: {"multitask": e} for name, e in evaluate(model, targets, rows, size, args, device, best).items()}
    round1 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    states = {t.name: best[t.name][1] if t.name in best else round1 for t in targets}

    # Candidates: every training image of every dataset and the unlabelled faces, never a test or validation image.
    candidates = np.setdiff1d(np.concatenate([i[sp.train] for sp, i in zip(splits, ids)] + [un_ids]), held)
    plain = [Target(**{**t.__dict__, "y": t.y.clone(), "mask": t.mask.clone(), "pseudo": t.pseudo.clone()})
             for t in targets]
    added = pseudo_label(model, states, targets, rows, candidates, size, args, device, args.pseudo_threshold,
                         args.pseudo_agreement, log)
    results = {}
    for name, tgts in (("multitask", plain), ("multitask+pseudo", targets)):
        model.load_state_dict(round1)
        torch.manual_seed(args.seed)  # the same dropout draws in both: the columns differ by the pseudo-labels only
        b = train(model, tgts, rows, size, args.pseudo_epochs, groups(), args, device, validate, desc=name,
                  start_epoch=args.epochs, best=best)
        for task_name, e in evaluate(model, tgts, rows, size, args, device, b).items():
            if name == "multitask+pseudo":
                e["pseudo_labels"] = added.get(task_name, 0)
                e["note"] = f"{added.get(task_name, 0)} pseudo-labels added"
                if e["epoch"] is not None and e["epoch"] <= args.epochs:  # no epoch with them did better on val
                    e["note"] += (f"; no epoch trained with them beat round 1's epoch {e['epoch']} on validation: "
                                  f"the model scored is multitask's round-1 model, which never saw a pseudo-label")
            results.setdefault(task_name, {})[name] = e
    return results

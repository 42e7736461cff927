"""Distillation from teachers that know the task (Wang et al. 2017): the student, trained on the task with the
task's loss plus a term pulling it toward a teacher's own answer.

- Alignment (a landmark task): the target model is the student + a landmark head; the distillation
  term is the L1 distance between its five points (the 68 iBUG points reduced to eye centres, nose tip
  and mouth corners) and MTCNN O-Net's five points on the same crop.
- Verification (Identity-LFW): for each fold the student learns the identities of the other folds
  (the unrestricted LFW protocol) with a softmax head; the distillation term is 1 - cos between a
  linear map of its embedding and the identity teacher's (SFace by default). Pairs are then compared
  by the cosine of the student's own embedding, the threshold picked on the other folds.

- Classification and age regression (gender, expression, age groups, age in years): transfer.py's `finetune`
  plus a term toward the teacher's own prediction (the registry's `answer`): its cached h_i through the
  model's last layer (age, gender), or the logits themselves (facex-expression). Hinton's soft targets at a
  temperature (KL divergence) for classes, the L1 distance to the teacher's expected age for a regression.
  class_map puts the teacher's classes onto the task's: by name (gender, expression), or by summing the ages
  of an age group (the 81 age classes onto UTKFace's 9 groups).

The same functions give the landmark and verification tasks' `finetune` (kd weight 0), `scratch` (random init,
no kd) and, for landmarks, `frozen` (only the head trains). Every loss is divided by its constant-predictor loss
(common.multitask), so --kd-weight 1 means "as much as the task".
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from . import landmarks as lm
from . import metrics, tasks
from .multitask import (JointModel, Rows, Target, build_backbone, embeddings, evaluate, lr_groups, task_target,
                        train, validator)

LANDMARK_METHODS = ("finetune", "frozen", "scratch", "kd")
VERIFICATION_METHODS = ("finetune", "scratch", "kd")
DEFAULT_TEACHER = {"landmarks": "onet", "verification": "sface"}
# A classification or regression task's knowledge -> the kind of teacher answer (TeacherSpec.answer) that serves it.
ANSWERS = {"Gender Prediction": "gender", "Age Classification": "age", "Age Regression": "age",
           "Emotion Classification": "expression"}
# Datasets name the same expression differently (RAF-DB "Happiness", FER2013 "Happy", facex "happy").
SYNONYMS = {"anger": "angry", "happiness": "happy", "sadness": "sad", "surprised": "surprise", "disgusted": "disgust",
            "fearful": "fear"}


def _answering(kind: str) -> list[str]:
    from .teachers import REGISTRY
    return [n for n, s in REGISTRY.items() if s.answer and s.answer.kind == kind]


def teacher_problem(task, name: str | None) -> str | None:
    """Why kd cannot run on `task` with teacher `name` (None: the default), or None when it can: a teacher that
    does not answer the task, or whose weights are not installed (checked without loading it)."""
    from .teachers import weights_problem

    return _task_problem(task, name) or weights_problem(name or _default_teacher(task))


def _default_teacher(task) -> str:
    """The teacher kd distils into a task it can take when no --kd-teacher is given."""
    return DEFAULT_TEACHER.get(task.kind) or _answering(ANSWERS[task.knowledge])[0]


def _task_problem(task, name: str | None) -> str | None:
    if task.kind == "landmarks":
        if name not in (None, "onet"):
            return (f"--kd-teacher {name}: the landmark task distils O-Net's points (onet), the one teacher here "
                    "that outputs landmarks")
        return None
    if task.kind == "verification":  # an identity embedding: a registry identity teacher, or a custom one
        return None if name is None else _identity_problem(name)
    from .teachers import REGISTRY
    want = ANSWERS.get(task.knowledge)
    if want is None:
        return (f"{task.name}: --method kd needs a teacher that knows the task; there are such teachers for "
                f"landmarks, verification and {', '.join(sorted(ANSWERS))} only")
    if name is not None and name not in _answering(want):
        return (f"--kd-teacher {name}: {task.name} distils a teacher's own {want} prediction, which "
                f"{', '.join(_answering(want))} give{'s' if len(_answering(want)) == 1 else ''}")
    classes = REGISTRY[name or _default_teacher(task)].answer.classes
    if want != "age" and task.num_outputs > len(classes):
        return (f"{task.name}: its {task.num_outputs} classes are more than the {len(classes)} that the kd teacher "
                f"knows ({', '.join(classes)})")
    return None


def _identity_problem(name: str) -> str | None:
    from .teachers import REGISTRY

    identity = ", ".join(n for n, s in REGISTRY.items() if s.role == "identity")
    base = name.split("@")[0]
    if base in REGISTRY:
        role = REGISTRY[base].role
        return None if role == "identity" else (f"--kd-teacher {name}: verification distils an identity embedding, "
                                                f"and {base} is a {role} teacher (identity teachers: {identity})")
    if ":" in name:  # a custom spec: weights_problem, asked next, parses it and says what is wrong
        return None
    return f"--kd-teacher: unknown teacher {name!r} (identity teachers: {identity}, or a custom spec string)"


def per_task(text: str | None) -> dict[str, str] | None:
    """--kd-teacher as TASK=NAME,TASK=NAME (a teacher for each task named, the default for the others), or None
    when it is one name for every task. A custom spec string is one name: its first part holds ':' or '/'."""
    if not text or "=" not in text:
        return None
    pairs = [part.split("=", 1) for part in text.split(",")]
    if not all(len(p) == 2 and p[0].strip() and ":" not in p[0] and "/" not in p[0] for p in pairs):
        return None
    return {task.strip(): name.strip() for task, name in pairs}


def named_teacher(task, text: str | None) -> str | None:
    """The --kd-teacher that `text` gives `task` (None: its default)."""
    mapping = per_task(text)
    return text if mapping is None else (mapping.get(task.name) or None)


def kd_teacher(task, args) -> str:
    name = named_teacher(task, args.kd_teacher)
    if why := teacher_problem(task, name):
        raise SystemExit(f"error: {why}")
    return name or _default_teacher(task)


def teacher_rows(rows: Rows, teacher_cache) -> tuple[np.ndarray, np.ndarray]:
    """(the teacher's h_i of every row, rows where both caches found the face)."""
    h = teacher_cache.features.take(np.arange(len(rows))).astype(np.float32)
    return h, np.asarray(rows.found) & np.asarray(teacher_cache.found)


def run(task, data, cache, method, args, device, teacher_cache) -> dict:
    """One method of LANDMARK_METHODS or VERIFICATION_METHODS (transfer.unavailable has refused the others)
    on a landmark or verification task; a transfer.py result entry."""
    rows = Rows()
    ids = rows.add(cache, data)
    if (ids != np.arange(len(ids))).any():
        raise SystemExit(f"error: {task.name}: the same image file is listed twice")
    runner = landmarks if task.kind == "landmarks" else verification
    return runner(task, data, rows, method, args, device, teacher_cache)


def _model(targets, method, args, device):
    torch.manual_seed(args.seed)  # before the backbone: scratch's weights are drawn there
    backbone, width, size = build_backbone("scratch" if method == "scratch" else "student", args.student, device)
    model = JointModel(backbone, width, targets, args.hidden).to(device)
    frozen = method == "frozen"
    if frozen:
        model.backbone.requires_grad_(False)
    return model, size, lr_groups(model, args, method == "scratch", frozen), frozen


def landmarks(task, data, rows, method, args, device, teacher_cache) -> dict:
    split, selection = tasks.with_validation(data.splits[0], 0, None, args.seed, args.val_frac)
    target = task_target(task, data, np.arange(len(rows)), rows, len(rows), split)
    target.extra["selection"] = selection
    targets = [target]
    truth = np.asarray([data.samples[i].label for i in split.test])
    # What knowing nothing about the face gives: the missed-face rule's mean shape on every test image.
    entry = {"mean_shape": float(metrics.nme(np.repeat(target.extra["mean_shape"][None], len(truth), 0), truth))}
    notes = [f"mean training shape alone: NME {entry['mean_shape']:.4f}"]
    if method == "kd":
        h, ok = teacher_rows(rows, teacher_cache)
        onet = lm.ONetPoints(device)
        crop = onet.from_features(torch.from_numpy(h)).double().cpu().numpy()
        # From the teacher cache's crop to this cache's crop (the same alignment unless the detector changed).
        pts = np.zeros_like(crop)
        pts[ok] = lm.to_crop(lm.from_crop(crop[ok], teacher_cache.matrices[ok]), rows.matrix(np.flatnonzero(ok)))
        mask = target.mask & torch.as_tensor(ok)
        k = target.n_out // 2
        kd = Target(f"kd:{kd_teacher(task, args)}", "landmarks", 10, torch.as_tensor(pts, dtype=torch.float32), mask,
                    weight=args.kd_weight, on=task.name, select=torch.as_tensor(lm.five_points(k), dtype=torch.float32))
        kd.fit_scale(np.flatnonzero(mask.numpy()))
        targets.append(kd)
        if k == 5:  # the teacher alone, on the same test images and rule
            test = split.test
            preds = np.repeat(target.extra["mean_shape"][None], len(test), 0)
            good = ok[test]
            preds[good] = lm.from_crop(crop[test][good], teacher_cache.matrices[test][good])
            entry["teacher"] = float(metrics.nme(preds, truth))
            notes.append(f"teacher O-Net's own points: NME {entry['teacher']:.4f}")
        notes.append(f"kd weight {args.kd_weight}")
    model, size, groups, frozen = _model(targets, method, args, device)
    best = train(model, targets, rows, size, args.epochs, groups, args, device,
                 validator(targets, rows, size, args, device), desc=f"{task.name} {method}", frozen=frozen)
    res = evaluate(model, targets, rows, size, args, device, best)[task.name]
    return {**res, "per_split": [res["value"]], **entry, "note": "; ".join(notes)}


def verification(task, data, rows, method, args, device, teacher_cache) -> dict:
    a, b, same, folds = tasks.pair_arrays(data)
    found = np.asarray(rows.found)
    labels = torch.as_tensor(np.array([s.label for s in data.samples], np.int64))
    n_ids = len(data.label_names or []) or int(labels.max()) + 1
    if method == "kd":
        h, ok = teacher_rows(rows, teacher_cache)
    splits = data.splits[: args.max_splits] if args.max_splits else data.splits
    accs, fits, teacher_accs, n_test, missed_test = [], [], [], 0, 0
    for f, split in enumerate(splits):
        mask = torch.zeros(len(rows), dtype=torch.bool)
        mask[torch.as_tensor(split.train[found[split.train]])] = True
        if not mask.any():  # every person of the other folds is tested in this one too (tasks._lfw)
            raise SystemExit(f"error: {task.name} {split.name}: no training face to learn identities from (every "
                             f"person of the other folds is one this fold tests, or no face was found)")
        ident = Target("identity", "classification", n_ids, labels, mask)
        ident.fit_scale(np.flatnonzero(mask.numpy()))
        targets = [ident]
        if method == "kd":
            kmask = mask & torch.as_tensor(ok)
            kd = Target(f"kd:{kd_teacher(task, args)}", "embedding", h.shape[1], torch.from_numpy(h), kmask,
                        weight=args.kd_weight)
            kd.fit_scale(np.flatnonzero(kmask.numpy()))
            targets.append(kd)
        model, size, groups, _ = _model(targets, method, args, device)
        train(model, targets, rows, size, args.epochs, groups, args, device, desc=f"{task.name} {method} {split.name}")
        emb = torch.nn.functional.normalize(embeddings(model, rows, np.arange(len(rows)), size, args, device), dim=1)
        fold = np.unique(folds)[f]
        scores = metrics.pair_scores(emb.numpy(), a, b, found)
        acc, fit = metrics.fold_accuracy(scores, same, folds == fold)
        accs.append(acc)
        fits.append(fit)
        n_test += int((folds == fold).sum())
        missed_test += int(np.isnan(scores[folds == fold]).sum())
        if method == "kd":
            t = torch.nn.functional.normalize(torch.from_numpy(h), dim=1).numpy()
            teacher_accs.append(metrics.fold_accuracy(metrics.pair_scores(t, a, b, ok), same, folds == fold)[0])
    entry = {"metric": "verification_accuracy", "value": float(np.mean(accs)), "std": metrics.fold_std(accs),
             "se": metrics.standard_error(accs),
             "per_split": [float(x) for x in accs], "chosen": None, "val": float(np.mean(fits)), "n_test": n_test,
             "missed_test": missed_test, "selection": f"no choice made: --epochs {args.epochs} fixed"}
    # Not the paper's protocol for its parenthesised LFW figures (identity first learnt on 100,000 VGGFace2
    # faces): no such corpus installs offline, so these are not comparable to theirs; the report says so.
    notes = ["identity learnt from the other folds' people, not the paper's 100,000 VGGFace2 faces; val: the "
             "threshold's accuracy on those folds' pairs, whose images the network trained on (no choice reads it)"]
    if teacher_accs:
        entry["teacher"] = float(np.mean(teacher_accs))
        notes.append(f"teacher {kd_teacher(task, args)}'s own embedding: {entry['teacher']:.4f} on the same "
                     f"{len(accs)} fold(s); kd weight {args.kd_weight}")
    return {**entry, "note": "; ".join(notes)}


# ------------------------------------------------------------------- classification and age regression
class TeacherAnswer(torch.nn.Module):
    """A registry teacher's own last layer (TeacherSpec.answer): h_i -> the log of its class probabilities (logs,
    so that a class far below the top keeps its value through the temperature instead of a floor)."""

    def __init__(self, name: str):
        super().__init__()
        import onnx
        from onnx import numpy_helper

        from .teachers import REGISTRY
        from .weights import package_file

        spec = REGISTRY[name]
        answer = spec.answer
        self.kind, self.classes, self.linear = answer.kind, answer.classes, None
        if not answer.weight:  # the layer read is the logits themselves
            return
        graph = onnx.load(str(package_file(spec.package, spec.file, spec.pip))).graph
        init = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        gemm = next((n for n in graph.node if n.op_type == "Gemm" and answer.weight in n.input), None)
        if gemm is None or answer.bias not in gemm.input:
            raise ValueError(f"teacher {name}: no Gemm reads {answer.weight} and {answer.bias} in {spec.file}")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gemm.attribute}
        if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0):
            raise ValueError(f"teacher {name}: its last Gemm scales or transposes its input ({attrs})")
        w = init[answer.weight] if attrs.get("transB", 0) else init[answer.weight].T
        if w.shape != (len(answer.classes), spec.dim):
            raise ValueError(f"teacher {name}: its last layer maps {w.shape[1]} values to {w.shape[0]}; the "
                             f"registry says {spec.dim} to {len(answer.classes)} classes")
        self.linear = torch.nn.Linear(spec.dim, len(answer.classes))
        self.linear.load_state_dict({"weight": torch.tensor(w), "bias": torch.tensor(init[answer.bias])})

    @torch.inference_mode()
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.linear(h.float()) if self.linear else h.float(), 1)


@dataclass
class SoftTargets:
    """kd's targets for a classification or regression task: the teacher's answer on every row, in task terms."""
    values: torch.Tensor    # (rows, classes) probabilities at the temperature, or (rows,) values scaled as the labels
    ok: torch.Tensor        # rows where the teacher's cache found the face
    preds: np.ndarray       # the teacher's own predictions in task units (class index, years), for its own score
    teacher: str
    temperature: float


def class_map(task, data, answer) -> np.ndarray:
    """(teacher classes, task classes) 0/1 matrix: by label name (SYNONYMS aside), or ages into the task's age
    groups. A task class that no teacher class names is refused: the teacher would teach that it never occurs.
    A teacher class the task lacks (neutral, for a set without it) maps nowhere: the soft targets are the
    teacher's answer among the task's classes. answer: a TeacherAnswer or the registry's Answer."""
    n_out = tasks.output_size(task, data)
    m = np.zeros((len(answer.classes), n_out))
    if answer.kind == "age":
        bins = task.params.get("age_bins")
        if bins is None or bins[0] > min(answer.classes):
            raise SystemExit(f"error: {task.name}: its classes are not age groups from age 0 (age_bins {bins}); kd "
                             f"cannot map the teacher's ages onto them")
        m[np.arange(len(answer.classes)), np.searchsorted(bins, answer.classes, side="right") - 1] = 1
        return m
    def canon(n):
        return SYNONYMS.get(str(n).lower(), str(n).lower())

    names = [canon(n) for n in (data.label_names or [])]
    for i, c in enumerate(answer.classes):
        if canon(c) in names:
            m[i, names.index(canon(c))] = 1
    if (m.sum(0) == 0).any():
        missing = [str(n) for n, k in zip(data.label_names, m.sum(0)) if k == 0]
        raise SystemExit(f"error: {task.name}: the kd teacher has no class for {missing} (its classes: "
                         f"{', '.join(map(str, answer.classes))})")
    return m


def soft_targets(task, data, teacher_cache, lo_hi, temperature: float, name: str) -> SoftTargets:
    """The teacher's answer on each of the task's images, from its cached h_i (rows in data.samples order)."""
    answer = TeacherAnswer(name)
    h = teacher_cache.features.take(np.arange(len(data.samples))).astype(np.float32)
    log_q = answer(torch.from_numpy(h)).double()
    ok = torch.as_tensor(np.asarray(teacher_cache.found, bool))
    if task.kind == "regression":
        years = (log_q.exp() @ torch.tensor(answer.classes, dtype=torch.float64)).numpy()
        values = torch.tensor((years - lo_hi[0]) / max(lo_hi[1] - lo_hi[0], 1e-9), dtype=torch.float32)
        return SoftTargets(values, ok, np.clip(years, *lo_hi), name, temperature)
    groups = torch.from_numpy(class_map(task, data, answer)).bool()
    log_p = torch.stack([torch.logsumexp(log_q[:, g], 1) for g in groups.T], 1)  # each task class's teacher classes
    # Hinton's softened targets: the teacher's logits (log p, up to a constant) divided by the temperature.
    soft = torch.softmax(log_p / temperature, 1).float()
    return SoftTargets(soft, ok, log_p.argmax(1).numpy(), name, temperature)


class KDLoss:
    """finetune's task loss plus --kd-weight times the distance to the teacher's answer, each divided by the
    loss of its best constant prediction on the training rows (as the landmark and verification kd do).

    Called on (outputs, (labels, soft targets, teacher found)) batches."""

    def __init__(self, task, task_loss, y, n_out: int, soft: SoftTargets, train_rows, weight: float):
        rows = torch.as_tensor(np.asarray(train_rows))
        t = Target(task.name, task.kind, n_out, y, torch.zeros(len(y), dtype=torch.bool))
        t.fit_scale(rows)
        self.task_loss, self.task_scale, self.weight = task_loss, t.scale, weight
        self.regression, self.temperature = task.kind == "regression", soft.temperature
        s = soft.values[rows[soft.ok[rows]]].double()
        if len(s) == 0:
            raise SystemExit(f"error: {task.name}: the kd teacher found no face among the training images")
        if self.regression:  # the best constant: the median value; for classes, the mean distribution
            const = (s - s.median()).abs().mean()
        else:
            const = (s * (s.clamp_min(1e-12).log() - s.mean(0).log())).sum(1).mean()
        self.kd_scale = float(const) if float(const) > 1e-6 else 1.0

    def distance(self, out, soft, temperature):
        """Per row: L1 for a regression, KL(teacher || student) at the temperature for classes."""
        if self.regression:
            return (out.squeeze(1) - soft).abs()
        return (soft * (soft.clamp_min(1e-12).log() - F.log_softmax(out / temperature, 1))).sum(1)

    def __call__(self, out, labels):
        y, soft, ok = labels
        d = self.distance(out, soft, self.temperature) * ok
        # mean over the rows the teacher saw, without reading a count back to the host
        kd = d.sum() / ok.sum().clamp_min(1)
        return self.task_loss(out, y) / self.task_scale + self.weight * kd / self.kd_scale

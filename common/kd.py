"""Distillation beyond classification (Wang et al. 2017): the student, trained on alignment or verification
with the task's loss plus a term pulling it toward a teacher that knows the task.

- Alignment (a landmark task): the target model is the student + a landmark head; the distillation
  term is the L1 distance between its five points (the 68 iBUG points reduced to eye centres, nose tip
  and mouth corners) and MTCNN O-Net's five points on the same crop.
- Verification (Identity-LFW): for each fold the student learns the identities of the other folds
  (the unrestricted LFW protocol) with a softmax head; the distillation term is 1 - cos between a
  linear map of its embedding and the identity teacher's (SFace by default). Pairs are then compared
  by the cosine of the student's own embedding, the threshold picked on the other folds.

The same functions give these tasks' `finetune` (kd weight 0), `scratch` (random init, no kd) and, for
landmarks, `frozen` (only the head trains). Every loss is divided by its constant-predictor loss
(common.multitask), so --kd-weight 1 means "as much as the task".
"""
from __future__ import annotations

import numpy as np
import torch

from . import landmarks as lm
from . import metrics, tasks
from .multitask import (JointModel, Rows, Target, build_backbone, embeddings, evaluate, lr_groups, task_target,
                        train, validator)

LANDMARK_METHODS = ("finetune", "frozen", "scratch", "kd")
VERIFICATION_METHODS = ("finetune", "scratch", "kd")
DEFAULT_TEACHER = {"landmarks": "onet", "verification": "sface"}


def kd_teacher(task, args) -> str:
    name = args.kd_teacher or DEFAULT_TEACHER[task.kind]
    if task.kind == "landmarks" and name != "onet":
        raise SystemExit(f"--kd-teacher {name}: the landmark task distils O-Net's points (onet), the one teacher "
                         "here that outputs landmarks")
    return name


def teacher_rows(rows: Rows, teacher_cache) -> tuple[np.ndarray, np.ndarray]:
    """(the teacher's h_i of every row, rows where both caches found the face)."""
    h = teacher_cache.features.take(np.arange(len(rows))).astype(np.float32)
    return h, np.asarray(rows.found) & np.asarray(teacher_cache.found)


def run(task, data, cache, method, args, device, log, teacher_cache=None) -> dict:
    """One method (finetune, frozen, scratch, kd) on a landmark or verification task; a transfer.py result entry."""
    allowed = LANDMARK_METHODS if task.kind == "landmarks" else VERIFICATION_METHODS
    if method not in allowed:
        raise SystemExit(f"{task.name}: method {method!r} is not available for a {task.kind} task "
                         f"(choose from {', '.join(allowed)})")
    rows = Rows()
    ids = rows.add(cache, data)
    if (ids != np.arange(len(ids))).any():
        raise SystemExit(f"{task.name}: the same image file is listed twice")
    runner = landmarks if task.kind == "landmarks" else verification
    return runner(task, data, rows, method, args, device, log, teacher_cache)


def _model(targets, method, args, device):
    backbone, width, size = build_backbone("scratch" if method == "scratch" else "student", args.student, device)
    torch.manual_seed(args.seed)
    model = JointModel(backbone, width, targets, args.hidden).to(device)
    frozen = method == "frozen"
    if frozen:
        model.backbone.requires_grad_(False)
    return model, size, lr_groups(model, args, method == "scratch", frozen), frozen


def landmarks(task, data, rows, method, args, device, log, teacher_cache) -> dict:
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


def verification(task, data, rows, method, args, device, log, teacher_cache) -> dict:
    pairs = data.pairs
    a, b = np.array([p.a for p in pairs]), np.array([p.b for p in pairs])
    same, folds = np.array([p.same for p in pairs]), np.array([p.fold for p in pairs])
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
        scores = _pair_scores(emb.numpy(), a, b, found)
        acc, fit = _fold_accuracy(scores, same, folds, fold)
        accs.append(acc)
        fits.append(fit)
        n_test += int((folds == fold).sum())
        missed_test += int(np.isnan(scores[folds == fold]).sum())
        if method == "kd":
            t = torch.nn.functional.normalize(torch.from_numpy(h), dim=1).numpy()
            teacher_accs.append(_fold_accuracy(_pair_scores(t, a, b, ok), same, folds, fold)[0])
    entry = {"metric": "verification_accuracy", "value": float(np.mean(accs)), "std": float(np.std(accs)),
             "per_split": [float(x) for x in accs], "chosen": None, "val": float(np.mean(fits)), "n_test": n_test,
             "missed_test": missed_test, "selection": f"no choice made: --epochs {args.epochs} fixed"}
    if teacher_accs:
        entry["teacher"] = float(np.mean(teacher_accs))
        entry["note"] = (f"teacher {kd_teacher(task, args)}'s own embedding: {entry['teacher']:.4f} on the same "
                         f"{len(accs)} fold(s); kd weight {args.kd_weight}")
    return entry


def _pair_scores(emb, a, b, found) -> np.ndarray:
    s = (emb[a] * emb[b]).sum(1)
    s[~(found[a] & found[b])] = np.nan  # a pair with a missed face counts as wrong
    return s


def _fold_accuracy(scores, same, folds, fold) -> tuple[float, float]:
    """LFW's rule for one fold: the threshold is the best one on the other folds' pairs.
    Returns (accuracy on the fold, accuracy on the other folds at that threshold)."""
    test = folds == fold
    t = metrics.best_threshold(scores[~test], same[~test])
    right = ((scores > t) == same) & ~np.isnan(scores)
    return float(right[test].mean()), float(right[~test].mean())

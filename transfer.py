"""Step 3 of the paper (sections 3.3, 4.1-4.3): transfer the student to a new face task, beside the baselines.

  python transfer.py --list                                    # every task (Table 1's and FER2013), with layouts
  python transfer.py --task AgeR-UTK --data /data/UTKFace      # student + MLP head, fine-tuned (the paper's h_G^(t,d))
  python transfer.py --task Expr-RAF --data /data/RAF --method all     # Table 3 / Table 6 style report
  python transfer.py                                           # embedded default: real LFW faces vs non-faces

Methods (--method, comma list or `all`):
  finetune  student + MLP head, every parameter trained (h_G^(t,d), the paper's final model)
  frozen    MLP on the frozen student embedding (\\hat h_G)
  scratch   the student's architecture from random init, trained on the task ("CNN" baseline)
  pcnn      the best PyTorch teacher fine-tuned whole with an MLP head ("P-CNN" baseline)
  fused     MLP on h_G = G(teachers) (E^G, needs the teachers and G of a fuse.py cache)
  concat    MLP with the paper-layout G's layer widths on all standardised h_i (Table 6 "Concat")
  pca       MLP on the PCA of all h_i, fitted on the fuse.py faces, at h_G's width (Table 6 "PCA")
  bt        best single teacher: an MLP per teacher, the best on validation reported (Table 6 "BT")
  bct       best combination of teachers: every subset, brute force, the best on validation (Table 6 "BCT")
  multitask one backbone with a head per task of --tasks, trained jointly on the union of their images, each
            image contributing the labels it has (2MD-MTL); --pseudo-label DIR adds data distillation (with
            one --task: the single-task baseline with and without it)
  kd        the student trained with the task loss plus a distillation term toward a teacher that knows the
            task (Wang 2017): O-Net's points (landmarks), the identity teacher's embedding (verification), the
            gender, age or expression teacher's own soft prediction (gender, age groups and years, expression)
  etl       ETL (John et al. 2022): keep the filters of the student (or --etl-base TEACHER) that tell most about
            the label on the training split, remove the others physically, fine-tune; one model per --prune
            ratio beside ratio 0 (= finetune), with size, MFLOPs and latency in etl.md / etl.png
Landmark tasks (Align-CelebA, Align-300W) take finetune, frozen, scratch and kd; Identity-LFW also takes
finetune, scratch and kd, which learn the identities of the other folds (unrestricted LFW protocol).
Faces the detector misses follow the paper's rule: a classification counts as wrong, a regression
predicts the middle of the label range; how many were missed is reported for every task.
Verification tasks (Identity-LFW) use the embedding directly: cosine of the pair, 10-fold accuracy.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from common import fusion, kd, metrics, multitask, precision, prune, tasks
from common.align import CANON, CROP_SIZE, DETECT_SIZE, SMALLEST_FACE
from common.cache import (CacheMismatch, FeatureCache, as_planned, file_stamps, hold_for_reading, list_hash, make_plan,
                          read_manifest, version_change, write_missed, write_reasons, writer_lock)
from common.extract import DETECTOR_FLAGS, KnownFaces, Options, detection_problem, extract
from common.facedata import N_PARAMS, Batches, aug_params, augment, first, resize
from common.files import write_json, write_text
from common.progress import Progress
from common.runs import (COUNT, POSITIVE, POSITIVE_INT, PROBABILITY, HelpFormatter, comparable, environment,
                         get_logger, holding_runs, kept_warnings, leave_stops_to_the_parent, make_run_dir,
                         one_process_only, pick_device, resume_defaults, resumed_value, run_main)
from common.student import DEFAULT, NotAStudent, head, load_student, pin, read_checkpoint, student_file, student_like
from common.teachers import REGISTRY, TeacherBackbone, build_teachers, cached_teacher, check_weights, load_config

METHODS = ("finetune", "frozen", "scratch", "pcnn", "fused", "concat", "pca", "bt", "bct", "etl")
EXTRA_METHODS = ("multitask", "kd")  # not in `all`: multitask is meant for several tasks, kd for tasks a teacher knows
TEACHER_FEATURE_METHODS = ("fused", "concat", "pca", "bt", "bct")  # MLP heads on the task's teacher features
HEAD_METHODS = ("frozen", *TEACHER_FEATURE_METHODS)  # an MLP head on fixed features (--head-epochs)
NETWORK_METHODS = ("finetune", "scratch", "pcnn", "etl", "multitask", "kd")  # a network trained on images (--epochs)
TEACHER_METHODS = (*TEACHER_FEATURE_METHODS, "pcnn")  # those that run the teachers on the task's faces
DEMO_TASK = tasks.DEMO_TASK
STUDENT = Path("runs/distill-demo")  # what README's `python distill.py` writes
# ETL cuts filters out of standard PyTorch layers: a teacher run by another runtime has none, and a port of an
# ONNX / TFLite model (one with a reference runtime) keeps its weights or per-channel constants outside them.
PRUNABLE_TEACHERS = [n for n, s in REGISTRY.items() if s.runtime == "torch" and not s.reference]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="transfer.py", description=__doc__, formatter_class=HelpFormatter)
    # counted from the registry, so that the help says what --list prints
    aliases = ", ".join(f"{a} = {t}" for a, t in tasks.ALIASES.items())
    p.add_argument("--list", action="store_true",
                   help=f"print the {len(tasks.TASKS)} tasks (the paper's Table 1 and FER2013; alias {aliases}) "
                        f"with their metric, protocol and data layout, then the embedded default task, and exit")
    p.add_argument("--task", help=f"task name (see --list), or your own data as folder:NAME (a folder per class), "
                                  f"csv:NAME or csv-regression:NAME (DIR/labels.csv rows file,label[,split]); default: "
                                  f"the embedded {DEMO_TASK}")
    p.add_argument("--tasks", help="comma list of tasks for one report table, each with its folder as NAME=DIR "
                                   "(instead of --task and --data)")
    p.add_argument("--data", type=Path, help="the task's dataset folder, in its own distributed layout")
    p.add_argument("--method", default="finetune",
                   help=f"comma list of {', '.join(METHODS + EXTRA_METHODS)}; all stands for the first "
                        f"{len(METHODS)} (all,kd adds kd), and shows n/a where a task cannot take one")
    p.add_argument("--student", "--checkpoint", dest="student", metavar="PATH", type=Path, default=STUDENT,
                   help="distill.py checkpoint or run folder (default: runs/distill-demo, the one `python distill.py` "
                        "writes)")
    p.add_argument("--cache", "--teacher-cache", dest="teacher_cache", metavar="DIR", type=Path, default=None,
                   help="fuse.py cache whose teachers, statistics and G the feature methods use (default: the one the "
                        "student learnt from, which distill.py records in it, when it is still there; else feats/demo)")
    p.add_argument("--teachers-config", type=Path, default=None, metavar="FILE",
                   help="where a teacher of your own of --cache is now, when its weight file moved since fuse.py "
                        "made the cache: a JSON config as fuse.py's, whose entries of the cache's teacher names "
                        "replace what the cache recorded of them (the weights must be the same: their sha256 is "
                        "checked)")
    p.add_argument("--embedding", default=None,
                   help="which h_G of the cache (default: the student's, when --cache is the cache it learnt from; "
                        "else the one fuse.py wrote last)")
    p.add_argument("--align", default=None, choices=["mtcnn", "none"],
                   help="mtcnn: detect and align faces; none: each whole image is the crop (face crops, objects). "
                        "Default: each task's own: none for Object-TinyImageNet and the embedded demo, else mtcnn")
    p.add_argument("--min-face-prob", type=PROBABILITY, default=None,
                   help="detector confidence below which no face counts. Default: as --detect-size, the student's "
                        "setting (else 0.9)")
    p.add_argument("--detect-size", type=int, default=None,
                   help="longer side of the copy MTCNN searches (see fuse.py --help). Default: the setting the "
                        "student's teacher cache was extracted with (else --cache's, else 640), so that task faces "
                        "are found as the faces the student learnt from were")
    p.add_argument("--smallest-face", type=POSITIVE_INT, default=None,
                   help="faces smaller than this many pixels of the detection copy are not searched for (see "
                        "fuse.py --help). Default: as --detect-size, the student's setting (else 20, every level)")
    p.add_argument("--epochs", type=int, default=10,
                   help="epochs of training a network on the images (finetune, scratch, pcnn, etl, multitask, kd; "
                        "on a landmark task frozen too, a joint model whose backbone stays fixed)")
    p.add_argument("--head-epochs", type=int, default=100,
                   help="epochs of the MLP on fixed features (frozen, fused, concat, pca, bt, bct; verification "
                        "compares their embeddings, no MLP). A flag that no method of the run reads on its tasks "
                        "is refused")
    p.add_argument("--batch", type=POSITIVE_INT, default=32, help="faces per training step of the methods that train a "
                   "network or a head (--batch-features: per teacher batch while caching features)")
    p.add_argument("--lr", type=POSITIVE, default=1e-3,
                   help="learning rate of the head (a pretrained backbone: --lr / 10; scratch's: --lr)")
    p.add_argument("--hidden", type=POSITIVE_INT, default=512, help="hidden width of the MLP head")
    p.add_argument("--max-splits", type=int, default=0,
                   help="run only the first N splits of a leave-one-out protocol, or folds of LFW (default: 0, all, "
                        "as the protocol says)")
    p.add_argument("--max-subsets", type=COUNT, default=0, help="cap on teacher subsets tried by bct (default: 0, all)")
    p.add_argument("--val-frac", type=float, default=0.1,
                   help="where a protocol has no validation split, this fraction of each split's training part "
                        "(of its persons, for leave-one-person-out) is held out to choose epochs and candidates")
    p.add_argument("--workers", type=COUNT, default=0,
                   help="image loading worker processes (default: 0, loading in the main process)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--amp", default="auto", choices=precision.CHOICES,
                   help="finetune, scratch, pcnn, etl and kd on classes or values: " + precision.HELP)
    p.add_argument("--seed", type=COUNT, default=0, help="seed of heads, fine-tuning and data order (default: 0)")
    p.add_argument("--task-cache", "--cache-dir", dest="cache_dir", metavar="DIR", type=Path, default=Path("feats/tasks"),
                   help="where the task's aligned faces (and teacher features) are cached for reuse")
    p.add_argument("--retry-unreadable", action="store_true",
                   help="extract again each shard of the task cache holding an image the system would not give last "
                        "time ('cannot read' in missed_faces-TASK.tsv: permission denied, an I/O error) that opens "
                        "now; otherwise such an image stays a missed face, scored wrong when it is a test image")
    p.add_argument("--run-dir", type=Path, help="run folder (default: runs/transfer-TIME)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir that stopped before its end: the (task, method) results its "
                        "report.json holds are kept, the others are run (all of them if it stopped before its first "
                        "result, or there is no run there yet); flags not given take the values of its args.json "
                        "(`--resume --run-dir RUN` alone continues it); refused when an argument that changes results "
                        "differs from its args.json, or a task's files, labels or splits changed since")
    p.add_argument("--batch-features", type=POSITIVE_INT, default=32,
                   help="faces per teacher batch when caching features")
    p.add_argument("--prune", default="0.5,0.75,0.9,0.97",
                   help="etl: comma list of pruning ratios (fraction of every layer's filters removed); ratio 0, "
                        "plain finetune with the same protocol, is always run beside them")
    p.add_argument("--etl-base", default="student",
                   help=f"etl: the network pruned: student (the --student checkpoint) or a PyTorch teacher built "
                        f"from standard layers ({', '.join(PRUNABLE_TEACHERS)})")
    p.add_argument("--etl-images", type=int, default=2000,
                   help="etl: at most this many training faces score the filters (no augmentation)")
    p.add_argument("--etl-keep", type=float, default=0.995,
                   help="etl: the reported ratio is the most pruned one keeping this share of ratio 0's "
                        "validation score (a rule modelled on the 99.5 %% of plain transfer ETL reports keeping); "
                        "chosen on validation only. A ratio is a share of filters, not of model size")
    g = p.add_argument_group("multitask (2MD-MTL) and kd (Wang 2017)")
    g.add_argument("--backbone", default="student",
                   help="multitask backbone: student (the --student checkpoint), scratch (its architecture, random "
                        "init) or a PyTorch teacher (onet, mobilenet_v2, ...)")
    g.add_argument("--pseudo-label", type=Path, metavar="DIR",
                   help="multitask data distillation (needs --method multitask): label these unlabelled faces (any "
                        "folder tree) and the other datasets' training images for the tasks they lack (attribute "
                        "tasks are not pseudo-labelled), then train on; reported beside the same training without "
                        "the pseudo-labels")
    g.add_argument("--pseudo-threshold", type=PROBABILITY, default=0.9,
                   help="keep a pseudo class when its probability, averaged over flips and scales, reaches this "
                        "(this project's choice, as is --pseudo-agreement: the paper's summary gives neither)")
    g.add_argument("--pseudo-agreement", type=PROBABILITY, default=0.05,
                   help="keep a pseudo value (regression, landmarks) when its std over flips and scales is at most "
                        "this fraction of the label range (of the face crop for landmarks)")
    g.add_argument("--pseudo-epochs", type=POSITIVE_INT, default=None,
                   help="epochs after pseudo-labelling (default: --epochs)")
    g.add_argument("--kd-weight", type=float, default=1.0,
                   help="weight of kd's distillation term (each term is in units of its constant-predictor loss)")
    g.add_argument("--kd-teacher", default=None,
                   help="kd's teacher: onet for landmark tasks (its 5 points), an identity teacher for verification "
                        "(default: sface), gender for gender tasks, age for age groups and age regression, "
                        "facex-expression for expression tasks; one name for every task, or TASK=NAME,TASK=NAME "
                        "(tasks not named keep their default)")
    g.add_argument("--kd-temperature", type=float, default=4.0,
                   help="kd on classes (gender, expression, age groups): the temperature of the teacher's and the student's "
                        "softmax in the distillation term (Hinton's soft targets)")
    args = p.parse_args(argv)
    if args.resume and args.run_dir:  # `--resume --run-dir RUN` alone: the rest as RUN ran
        args = resume_defaults(p, argv, args, Path(args.run_dir), "transfer", keep=("resume", "run_dir"),
                               rebase={"tasks": tasks_from})
    return args


def tasks_from(jobs: str, cwd: str) -> str:
    """--tasks NAME=DIR,... with each DIR made absolute from the folder cwd (a run resumed elsewhere)."""
    return ",".join(f"{name}={os.path.realpath(os.path.join(cwd, folder))}" if folder else name
                    for name, _, folder in (item.partition("=") for item in jobs.split(",")))


# ------------------------------------------------------------------------------------------- the data
def demo_task(root: Path = Path("data/lfw_subset"), write: bool = True) -> tuple[tasks.Task, Path]:
    """scikit-image's lfw_subset: 100 real 25x25 LFW faces and 100 non-faces, as a folder-per-class task.
    write=False: the task alone, its folder not written yet (the run's checks come first)."""
    from PIL import Image

    from common.demo import package_dir

    if write and not (root / ".complete").exists():
        imgs = np.load(package_dir("skimage") / "data" / "lfw_subset.npy")
        for i, img in enumerate(imgs):
            cls = "face" if i < 100 else "nonface"
            (root / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray((img * 255).round().astype(np.uint8)).save(root / cls / f"{i:03d}.png")
        (root / ".complete").write_text("complete\n")
    # 25x25 crops are already faces, too small for a detector
    return tasks.folder_task(DEMO_TASK, root=root, knowledge="Face vs non-face", per_class_split=True,
                             align="none"), root


def other_versions(cache_dir: Path, plan: dict, path: Path) -> list[str]:
    """The task caches under cache_dir made from the folder of `plan` with the same teachers and detector
    setting (a folder whose files changed leaves its old cache behind: at millions of faces worth a line in
    the log)."""
    names = lambda m: [t.get("name") for t in m.get("teachers", [])]
    return [str(other) for other, old in task_caches(cache_dir)
            if other != path and names(old) == names(plan)
            and all(as_planned(old).get(k) == plan[k] for k in ("data_root", "align", "min_face_prob", "detect_size",
                                                                 "smallest_face", "crop_size"))]


def align_of(task, args) -> str:
    return args.align or task.align


def detection_settings(args, student_cfg, aligns):
    """Fills --detect-size, --smallest-face and --min-face-prob left unset with those the student's faces were found
    with (its teacher cache's, which distill.py records), else --cache's, else the detector's defaults: a task's
    faces found otherwise would be cropped from other boxes and landmarks than the student learnt from.
    aligns: the alignments of the run's tasks."""
    detect = "mtcnn" in aligns
    known = dict(student_cfg or {})
    if not known.get("detect_size"):
        try:
            known = as_planned(read_manifest(args.teacher_cache))
        except (OSError, CacheMismatch):
            known = {}
    for flag in DETECTOR_FLAGS:
        default = getattr(Options, flag)  # the engine's defaults, also fuse.py's
        if getattr(args, flag) is None:
            setattr(args, flag, (known.get(flag) or default) if detect else default)
    if why := detection_problem("mtcnn" if detect else "none", args.detect_size, args.smallest_face):
        raise SystemExit(f"error: {why}")


def task_caches(cache_dir: Path):
    """(folder, manifest) of every readable task cache under cache_dir."""
    for m in sorted(Path(cache_dir).glob("*/manifest.json")):
        try:
            yield m.parent, read_manifest(m.parent)
        except (OSError, CacheMismatch):
            continue


def find_faces_donor(cache: FeatureCache, cache_dir: Path) -> FeatureCache | None:
    """A finished, undamaged task cache of the same files and detector setting (another teacher set's): its
    faces are reused, so that each teacher set does not detect them again."""
    for other, manifest in task_caches(cache_dir):
        if other != cache.path and KnownFaces.matches(cache.manifest, manifest):
            try:  # a damaged cache lying there is passed over, never a reason to stop
                donor = FeatureCache(other)
                if not donor.damaged_shards(every=True):
                    return donor
            except (OSError, CacheMismatch):
                continue
    return None


def task_files(data) -> tuple[Path, list[str]]:
    """(root, the images' paths under it): the folder a task's caches are made from."""
    paths = [os.path.abspath(s.path) for s in data.samples]
    root = Path(os.path.commonpath([os.path.dirname(p) for p in paths]))
    return root, [os.path.relpath(p, root) for p in paths]


def task_cache(data, teachers, args, device, log, align, crop_size=CROP_SIZE, stamps=None) -> FeatureCache:
    """Aligned faces (and the teachers' h_i when teachers are given) of every sample, cached for reuse; the crop
    store at crop_size pixels (CANON: the canonical crop the teachers take at extraction, for fine-tuning one).

    Keyed by the images, not by the task: AgeR-, AgeC-, Gender- and Ethnic-UTK read the same files and share
    one cache per teacher set, whether the task was given DIR or DIR/UTKFace. The files' names, sizes and
    times are in the key too, so a folder rebuilt or edited gets a cache of its own, as does each detector
    setting (they change which faces are found)."""
    root, rel = task_files(data)
    where = root.resolve()
    boxes = [s.box for s in data.samples]  # AffectNet's face boxes: each image's face is searched around its own
    # whole images (--align none) take no detector setting: one cache whatever the run's other tasks set
    detect = Options(align=align, min_face_prob=args.min_face_prob, batch=args.batch_features, workers=args.workers,
                     detect_size=args.detect_size, smallest_face=args.smallest_face) if align == "mtcnn" else \
        Options(align=align, batch=args.batch_features, workers=args.workers)
    plan = make_plan(root, rel, teachers, shard_size=4096, dtype="float32", align=align,
                     min_face_prob=detect.min_face_prob, crop_size=crop_size, detect_size=detect.detect_size,
                     smallest_face=detect.smallest_face, boxes=boxes, stamps=stamps)
    setting = f"{align}-p{detect.min_face_prob:g}" if align == "mtcnn" else align  # for the name
    if align == "mtcnn":  # the defaults add nothing, so that caches made before these flags stay found
        setting += f"-d{detect.detect_size}" * (detect.detect_size != DETECT_SIZE)
        setting += f"-s{detect.smallest_face}" * (detect.smallest_face != SMALLEST_FACE)
    setting += f"-c{crop_size}" * (crop_size != CROP_SIZE)
    teacher_names = [t.name for t in teachers]
    key = hashlib.sha1("\0".join([plan["list_hash"], *teacher_names, setting]).encode("utf-8", "surrogateescape"))
    key.update(os.fsencode(where))
    if plan["boxes"]:
        key.update(plan["boxes"].encode())
    # The name only helps a reader find a cache: any byte a file system may refuse becomes _, and it is
    # kept short (a long folder name or a custom teacher's spec made it too long to create).
    readable = re.sub(r"[^A-Za-z0-9_.+-]", "_", "-".join([where.name or "root", *teacher_names]))[:80]
    path = args.cache_dir / f"{readable}-{setting}-{key.hexdigest()[:12]}"
    if not (path / "manifest.json").exists() and (older := other_versions(args.cache_dir, plan, path)):
        log.info(f"new task cache {path}; the same folder and teachers have other caches, made from another list "
                 f"of its files (an earlier version of the folder, another task reading part of it, or an older "
                 f"transfer.py): {', '.join(older)}. Delete those that no task reads any more.")
    with writer_lock(path, log) as locked:
        try:
            cache = FeatureCache.create_or_resume(path, root, rel, teachers, plan=plan, locked=locked)
        except CacheMismatch as e:
            why = "; ".join(e.problems) or str(e)
            raise SystemExit(f"error: the task cache {path} was made differently ({why}): delete that folder to "
                             f"rebuild it, or pass another --task-cache") from None
        redo = cache.remove_damaged(log) + (cache.remove_unread(log) if args.retry_unreadable else 0)
        if redo or not cache.manifest.get("complete"):
            extract(cache, teachers, device, detect, log=log, faces_from=find_faces_donor(cache, args.cache_dir))
            cache.finalize()
            cache = FeatureCache(path)
    return cache


class TaskFaces(torch.utils.data.Dataset):
    """(uint8 crops, labels) of the given samples from the task cache's crop store, a batch at a time."""

    def __init__(self, cache: FeatureCache, rows, labels):
        """labels: a tensor over the cache's rows, or a tuple of them (kd's labels, soft targets, teacher found)."""
        self.crops, self.rows, self.labels = cache.crops, np.asarray(rows, np.int64), labels

    def __len__(self):
        return len(self.rows)

    def __getitems__(self, idx):
        rows = self.rows[idx]
        crops = torch.from_numpy(np.ascontiguousarray(self.crops.take(rows))).permute(0, 3, 1, 2)
        r = torch.from_numpy(rows)
        return crops, tuple(t[r] for t in self.labels) if isinstance(self.labels, tuple) else self.labels[r]


def face_batches(cache, rows, labels, size, train, args, device):
    """() -> iterator of (pixels on device, labels on device); augmented on the device when training, with
    draws from a generator of the main process, so the pixels do not depend on the number of workers. The
    loader's own generator seeds its iterators: from torch's global one (one draw an epoch without workers, one
    in all with kept workers), they shifted the head's dropout masks with --workers."""
    sampler = Batches(len(rows), args.batch, train, args.seed)
    dl = torch.utils.data.DataLoader(TaskFaces(cache, rows, labels), num_workers=args.workers, collate_fn=first,
                                     batch_sampler=sampler, pin_memory=torch.device(device).type == "cuda",
                                     persistent_workers=args.workers > 0, generator=torch.Generator(),
                                     worker_init_fn=leave_stops_to_the_parent)
    rng = np.random.default_rng(args.seed)
    epochs = itertools.count()

    def it():
        sampler.set_epoch(next(epochs))
        for crops, t in dl:
            crops = crops.to(device, non_blocking=True)
            if train:
                x = augment(crops, torch.from_numpy(aug_params(rng.random((len(crops), N_PARAMS)))), size)
            else:
                x = resize(crops, size)
            yield x, (tuple(v.to(device, non_blocking=True) for v in t) if isinstance(t, tuple)
                      else t.to(device, non_blocking=True))
    return it


# ------------------------------------------------------------------------------------- heads and loss
def targets(task, data) -> tuple[torch.Tensor, tuple | None]:
    """Labels as a tensor the loss takes; regression targets scaled to [0, 1] over the label range."""
    labels = [s.label for s in data.samples]
    if task.kind == "regression":
        y = np.asarray(labels, np.float64)
        lo_hi = task.label_range or tasks.label_range_seen(task, data, y)
        return torch.tensor((y - lo_hi[0]) / max(lo_hi[1] - lo_hi[0], 1e-9), dtype=torch.float32), lo_hi
    if task.kind == "multilabel":
        return torch.tensor(np.asarray(labels, np.float32)), None
    return torch.tensor(np.asarray(labels, np.int64)), None


def task_loss(task, out, y):
    if task.kind == "regression":
        return F.l1_loss(out.squeeze(1), y)
    if task.kind == "multilabel":
        return F.binary_cross_entropy_with_logits(out, y)
    return F.cross_entropy(out, y)


def decode(task, out: np.ndarray, lo_hi) -> np.ndarray:
    """Network outputs -> predictions in the task's units (class index, years, attribute logits)."""
    if task.kind == "regression":
        # No age is below the range's floor or above its top: a prediction past them is brought back.
        return np.clip(out[:, 0] * (lo_hi[1] - lo_hi[0]) + lo_hi[0], *lo_hi)
    if task.kind == "multilabel":
        return np.where(np.isnan(out), np.nan, out > 0)  # NaN: counted wrong, as a missed face's
    return metrics.class_indices(out)


def score(task, preds, y_true) -> float:
    return metrics.METRICS[task.metric](preds, y_true)


def fit(model, train_batches, val_batches, task, epochs, lo_hi, y_val, lr_groups, desc, amp=(None, None), loss=None):
    """Train with Adam; keep the weights of the best validation epoch when there is a validation set.

    amp: (autocast dtype or None, GradScaler or None), as precision.amp_policy gives them.
    loss: (outputs, the batch's labels) -> loss; default the task's own (kd adds its term).
    Returns that best validation score (None without a validation set).
    """
    loss = loss or (lambda out, y: task_loss(task, out, y))
    opt = torch.optim.Adam(lr_groups)
    amp_dtype, scaler = amp
    best, best_state = None, None
    taken, steps = (scaler.taken if scaler is not None else None), 0
    bar = Progress(desc)
    for epoch in range(epochs):
        model.train()
        finite = True  # a device flag, read once an epoch: a check each step would make the host wait
        for x, y in train_batches():
            with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                out = model(x)
            step_loss = loss(out.float(), y)
            precision.backward_step(step_loss, opt, scaler)
            finite = torch.isfinite(step_loss.detach()) & finite
            steps += 1
            bar.update(len(x), epoch=f"{epoch + 1}/{epochs}")
        # (float16's scaler skips a step with inf or NaN and lowers its scale; its own rule and the one below)
        if scaler is None and not bool(finite):
            raise FloatingPointError(f"{desc}: the training loss became inf or NaN in epoch {epoch + 1} "
                                     f"(weights diverged or a non-finite input); lower --lr")
        if val_batches is not None:
            s = score(task, decode(task, predict(model, val_batches()), lo_hi), y_val)
            if best is None or metrics.better(task.metric, s, best):
                best, best_state = s, {k: v.detach().clone() for k, v in model.state_dict().items()}
    if scaler is not None and steps and scaler.taken == taken:  # a short fit whose every step overflowed: untrained
        raise FloatingPointError(f"{desc}: float16's loss scaler skipped every step (inf or NaN gradients, loss scale "
                                 f"{scaler.get_scale():.3g}): the model never trained; lower --lr, or use --amp bf16 "
                                 f"(on sm_80 and newer) or --amp off")
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return best


@torch.no_grad()
def predict(model, batches) -> np.ndarray:
    model.eval()
    return np.concatenate([model(x).float().cpu().numpy() for x, _ in batches])


# ------------------------------------------------------------------------------------------ methods
def feature_batches(x: torch.Tensor, y: torch.Tensor, rows, batch, shuffle, seed=0):
    rng = np.random.default_rng(seed)  # made once, so that each epoch gets a new order

    def it():
        order = rng.permutation(rows) if shuffle else rows
        for i in range(0, len(order), batch):
            idx = torch.as_tensor(order[i:i + batch])
            yield x[idx], y[idx]
    return it


def run_on_features(task, feats: torch.Tensor, y, lo_hi, split, found, n_out, args, widths=None, desc="head"):
    """Train an MLP on fixed features for one split; returns (predictions on split.test, val score)."""
    torch.manual_seed(args.seed)
    train = split.train[found[split.train]]
    model = head(feats.shape[1], n_out, args.hidden, widths)
    val_rows = val_rows_of(split, found)
    val = feature_batches(feats, y, val_rows, 256, False) if val_rows is not None else None
    y_val = decode_labels(task, y[val_rows].numpy(), lo_hi) if val is not None else None
    val_score = fit(model, feature_batches(feats, y, train, args.batch, True, args.seed), val, task,
                    args.head_epochs, lo_hi, y_val, [{"params": model.parameters(), "lr": args.lr}], desc)
    out = predict(model, feature_batches(feats, y, split.test, 256, False)())
    return decode(task, out, lo_hi), val_score


def val_rows_of(split, found):
    """The split's validation faces that were found, or None when the protocol has no validation set."""
    if split.val is None:
        return None
    rows = split.val[found[split.val]]
    return rows if len(rows) else None


def decode_labels(task, y: np.ndarray, lo_hi):
    return y * (lo_hi[1] - lo_hi[0]) + lo_hi[0] if task.kind == "regression" else y


def fine_tunes_teacher(method, args) -> bool:
    """P-CNN, and ETL pruning a teacher: a teacher network trained on the task's images."""
    return method == "pcnn" or (method == "etl" and args.etl_base != "student")


def teacher_crops(data, cache, args, device, log, align, stamps=None) -> FeatureCache:
    """The task's faces at the canonical crop's full size, from which each teacher cut its input at extraction:
    a teacher fine-tuned (P-CNN) sees its input as BT and BCT read its features, where the 128-pixel store would
    hand it an enlarged copy (facex's 200-pixel input from 84 pixels). Its faces are the main cache's (reused,
    not detected again); 4 times the store's disk (192 kB a face)."""
    wide = task_cache(data, [], args, device, log, align, crop_size=CANON, stamps=stamps)
    if not np.array_equal(wide.found, cache.found):  # reused detections find the same faces: never expected
        raise SystemExit(f"error: the task caches {cache.path} and {wide.path} found different faces; delete "
                         f"{wide.path} to have it made again from the first")
    return wide


def run_on_images(task, cache, y, lo_hi, split, found, n_out, args, device, student_cfg, method, log, teacher=None,
                  ratio=None, soft=None):
    """finetune / scratch / pcnn / etl / kd: a backbone + head trained end to end on the task's images for one split.
    kd is finetune with `soft` (kd.SoftTargets), the teacher's answers, as a second target."""
    torch.manual_seed(args.seed)
    method_net = "pcnn" if fine_tunes_teacher(method, args) else method
    teacher = args.etl_base if method == "etl" and method_net == "pcnn" else teacher
    if method_net == "pcnn":
        # Teachers take the whole canonical crop (teacher_crops) and cut their own box from it.
        # @torch: a teacher ported from ONNX / TFLite is fine-tuned as its PyTorch module, on the CPU too
        backbone, size = TeacherBackbone(build_teachers([f"{teacher}@torch"], device)[0]), cache.crop_size
    elif method == "scratch":
        backbone = student_like(student_cfg)  # a pruned --student's own layer widths
        size = student_cfg.get("size", 112)
    else:
        backbone, size = load_student(args.student)[0], student_cfg.get("size", 112)
    width = backbone.out_dim if method_net == "pcnn" else student_cfg["out_dim"]
    model = nn.Sequential(backbone, head(width, n_out, args.hidden)).to(device)
    train = split.train[found[split.train]]

    def loader(rows, is_train):
        return face_batches(cache, rows, y, size, is_train, args, device)

    val_rows = val_rows_of(split, found)
    val = loader(val_rows, False) if val_rows is not None else None
    y_val = decode_labels(task, y[val_rows].numpy(), lo_hi) if val is not None else None

    def make_input(b, dev):  # ETL's example pixels, as the loader gives them (teachers insist on uint8)
        return prune.example_pixels(b, size, dev, torch.uint8 if method_net == "pcnn" else torch.float32)

    if method == "etl" and ratio:
        # Filters are scored on a seeded subset of the training split only, before any fine-tuning.
        scored = np.random.default_rng(args.seed).permutation(train)[: args.etl_images]
        prune.etl_prune(model[0], make_input(1, device), loader(scored, False)(), task.kind, ratio, args.etl_images)
        with torch.no_grad():
            pruned_width = model[0](make_input(1, device)).shape[1]
        if pruned_width != width:  # (a teacher's last filters cut); else ratio 0's head, the same draws after it
            model[1] = head(pruned_width, n_out, args.hidden).to(device)
    if device.type == "cuda":  # after pruning, which rebuilds the weights it cuts in the default layout
        model = model.to(memory_format=torch.channels_last)
    # The pretrained backbone moves slower than the new head; from scratch, both move at the head's pace.
    lr_back = args.lr if method == "scratch" else args.lr / 10
    groups = [{"params": model[0].parameters(), "lr": lr_back}, {"params": model[1].parameters(), "lr": args.lr}]
    labels, loss = y, None
    if method == "kd":
        labels = (y, soft.values, soft.ok.float())
        loss = kd.KDLoss(task, lambda out, t: task_loss(task, out, t), y, n_out, soft, train, args.kd_weight)
    val_score = fit(model, face_batches(cache, train, labels, size, True, args, device), val, task, args.epochs,
                    lo_hi, y_val, groups, f"{method}", amp=precision.amp_policy(args.amp, device), loss=loss)
    if method == "etl":
        etl = {"task": task.name, "ratio": ratio, "base": args.etl_base, "n_out": n_out, "kind": task.kind,
               "label_range": lo_hi, "hidden": args.hidden, "split": split.name}
        cfg = {**student_cfg, "etl": etl} if method_net != "pcnn" else {"size": size, "etl": etl}
        prune.finish(model, Path(args.run_dir) / "etl" / task.name / f"r{ratio:g}", make_input, device, cfg, log)
    # Missed faces (unreadable files among them) are not run: the missed-face rule decides their answer.
    test_ok = split.test[found[split.test]]
    out = np.zeros((len(split.test), n_out), np.float32)
    if len(test_ok):
        out[found[split.test]] = predict(model, loader(test_ok, False)())
    return decode(task, out, lo_hi), val_score


@torch.no_grad()
def student_embeddings(cache, args, device, student_cfg) -> torch.Tensor:
    """Student embeddings of every sample; rows without a usable face stay zero (the rule replaces them)."""
    student, _ = load_student(args.student, device)
    rows = np.flatnonzero(cache.found)
    out = torch.zeros(len(cache.images), student_cfg["out_dim"])
    batches = face_batches(cache, rows, torch.zeros(len(cache.images)), student_cfg.get("size", 112), False, args,
                           device)
    if len(rows):
        out[rows] = torch.cat([student(x).float().cpu()
                               for x, _ in tqdm(batches(), desc="student", disable=None, leave=False)])
    return out


class TeacherFeatures:
    """The task's h_i in the units G `embedding` was trained in (standardised with its statistics, which come
    from fuse.py's cache, never from the task's own faces)."""

    def __init__(self, task_cache: FeatureCache, unsup: FeatureCache, embedding: str):
        mean, std = unsup.input_stats(embedding)
        # in place, in float32: (x - mean) / std with float64 statistics held ~6 copies of the task's features
        # at its peak (~25 GB for CelebA's 202,599 faces)
        x = np.asarray(task_cache.features.take(np.arange(len(task_cache.images))), dtype=np.float32)
        x -= mean.astype(np.float32)
        x /= std.astype(np.float32)
        self.x = torch.from_numpy(x)
        self.slices = unsup.slices()

    def subset(self, names) -> torch.Tensor:
        return torch.cat([self.x[:, self.slices[n]] for n in names], 1)


class Subsets(Mapping):
    """{name: features} of teacher subsets, each built when the search reaches it and dropped after: bct
    over the 63 subsets of 6 teachers holds at most two subsets beside the full h_i (n x sum of widths
    floats), where building them all first took ~10 GB for UTKFace and ~83 GB for CelebA."""

    def __init__(self, features: "TeacherFeatures", subsets):
        self.features, self.subsets = features, {"+".join(c): list(c) for c in subsets}

    def __getitem__(self, name) -> torch.Tensor:
        return self.features.subset(self.subsets[name])

    def __iter__(self):
        return iter(self.subsets)

    def __len__(self) -> int:
        return len(self.subsets)


# -------------------------------------------------------------------------------------------- driver
def unavailable(task, method, kd_teacher) -> str | None:
    """Why a method cannot run on a task (None: it can); asked of every task and method before any work."""
    if method == "multitask":
        return None
    if method == "kd":  # kd_teacher: --kd-teacher as given (one name, or one per task)
        return kd.teacher_problem(task, kd.named_teacher(task, kd_teacher))
    if task.kind == "landmarks":
        ok = kd.LANDMARK_METHODS
    elif task.kind == "verification":  # embeddings compared by cosine, or a model trained on identities
        ok = kd.VERIFICATION_METHODS + HEAD_METHODS
    else:
        ok = METHODS
    return None if method in ok else (f"{task.name}: --method {method} is not available for a {task.kind} task "
                                      f"(available: {', '.join(ok)})")


DEMO_CACHE = Path("feats/demo")


def students_record(args) -> dict | None:
    """The --student's config (where it learnt from: cache, h_G), if one reads there; for runs whose methods
    do not run the student, so an unreadable one is not a reason to stop."""
    try:
        return read_checkpoint(args.student, tensors=False)[0]
    except (OSError, NotAStudent):
        return None


def the_students_cache(args, student_cfg) -> None:
    """--cache left unset: the cache the student learnt from, if it is still where distill.py recorded it, so that
    the student's columns and the teacher-feature columns (fused, concat, ...) come from one fuse.py run."""
    if args.teacher_cache is not None:
        return
    recorded = Path((student_cfg or {}).get("teacher_cache") or DEMO_CACHE)
    same = recorded.resolve() == DEMO_CACHE.resolve()  # the demo's kept as written: a --resume compares it
    args.teacher_cache = DEMO_CACHE if same or not (recorded / "manifest.json").is_file() else recorded


def its_cache(unsup: FeatureCache, student_cfg) -> bool:
    """Whether unsup is the cache the student learnt from: the same content (a copy elsewhere is), or for a
    student saved before the content was recorded, the same folder."""
    mine = (student_cfg or {}).get("cache_content")
    if mine:
        return mine == unsup.manifest.get("content_hash")
    recorded = (student_cfg or {}).get("teacher_cache")
    return bool(recorded) and Path(recorded).resolve() == Path(unsup.path).resolve()


def pairing_warning(unsup: FeatureCache, embedding: str | None, student_cfg) -> str | None:
    """What differs between the student and the h_G the teacher-feature methods read: the two kinds of columns
    then stand for two fusions (another cache's G, or another G of the same cache)."""
    if not student_cfg or not student_cfg.get("embedding"):
        return None
    mine = student_cfg.get("cache_content")
    if mine and mine != unsup.manifest.get("content_hash"):
        return (f"warning: the student learnt from the cache {student_cfg.get('teacher_cache')}, the teacher-feature "
                f"methods read {unsup.path}, made of other images or teachers: their columns are of two fusions")
    if embedding != student_cfg["embedding"]:
        return (f"warning: the student learnt h_G '{student_cfg['embedding']}', the teacher-feature methods read "
                f"h_G '{embedding}' of {unsup.path}: their columns are of two fusions (--embedding names one)")
    learnt, now = student_cfg.get("embedding_version"), unsup.embedding_dir(embedding).name
    if mine and learnt and learnt != now:  # fuse.py fitted G anew since: the same name, another fusion
        return (f"warning: the student learnt h_G '{embedding}' as it was then ({learnt}); fuse.py has written it "
                f"anew since ({now}), which the teacher-feature methods read: their columns are of two fusions")
    return None


def teacher_source(args, need: list[str], device, student_cfg=None) -> tuple:
    """(cache, h_G name, h_G width, teachers) of the fuse.py cache that the teacher-feature methods `need` read
    (all None and no teacher when none is needed). Checked once, before the run folder is made: a cache without
    G, or made by other teacher versions, stops the run before any work. student_cfg: the student's, whose h_G
    is the default when this is its cache."""
    if not need:
        return None, None, None, []
    hold_for_reading(args.teacher_cache)  # fuse.py --overwrite (--retry-unreadable ...) of it refused meanwhile
    try:
        unsup = FeatureCache(args.teacher_cache).require_complete()
    except (FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"error: --method {','.join(need)} needs the teachers, their statistics and G "
                         f"of a fuse.py cache: {e}")
    # The h_G (with its G and units) that the teacher-feature methods read: one, resolved once; the student's
    # when this is its cache
    names = unsup.embedding_names()
    own = (student_cfg or {}).get("embedding")
    if not args.embedding and own in names and its_cache(unsup, student_cfg):
        args.embedding = own
    embedding = args.embedding or next(iter(names), None)
    try:
        g_dim = unsup.embedding(embedding or "ae")[1]["dim"]
    except FileNotFoundError as e:
        raise SystemExit(f"error: --method {','.join(need)} needs G and h_G: {e}")
    # one version of h_G (G, units, split) for every task and method, whatever fuse.py writes meanwhile
    unsup.pin_embedding(embedding or "ae")
    moved = {s.name: s for s in load_config(args.teachers_config)} if args.teachers_config else {}
    if unknown := sorted(set(moved) - {t["name"] for t in unsup.teachers}):
        raise SystemExit(f"error: --teachers-config {args.teachers_config} names {', '.join(unknown)}, no teacher of "
                         f"{args.teacher_cache} ({', '.join(t['name'] for t in unsup.teachers)})")
    for t in unsup.teachers:  # before they load, as the cache's own records are
        if t["name"] in moved:
            check_weights(moved[t["name"]], t["version"])
    try:
        teachers = build_teachers([moved.get(t["name"]) or cached_teacher(t) for t in unsup.teachers], device)
    except FileNotFoundError as e:  # a weight file of one's own, moved since the cache was made
        raise SystemExit(f"error: {e}: put it back, or say where it is now with --teachers-config FILE (entries "
                         f'{{"spec": ..., "name": ...}} of the cache\'s teacher names, as fuse.py takes)') from None
    if other := [(t.name, t.version, r["version"]) for t, r in zip(teachers, unsup.teachers)
                 if t.version != r["version"]]:
        name, here, there = other[0]
        same_file = here.split(":")[1:2] == there.split(":")[1:2]
        fix = ("give it the overrides the cache was made with (--teachers-config: mean, std, box ...)" if same_file
               else "put back the weight file it was made with" if there.startswith("user:")
               else "install the same teacher packages")
        raise SystemExit(f"error: the teachers here differ from those that made {args.teacher_cache} "
                         f"({version_change(name, there, here)}): the task's h_i would not be G's inputs; {fix}, "
                         f"or make a cache with these by fuse.py")
    return unsup, embedding, g_dim, teachers


def needs_teachers(task, methods, args) -> list[str]:
    # (a method shown n/a for this task, from --method all, needs nothing)
    return [m for m in methods if m in TEACHER_METHODS and not unavailable(task, m, args.kd_teacher)]


def evaluate_task(task, data, methods, args, device, run, log, student_cfg, save, done, source, inputs, commit,
                  checked) -> dict:
    """Every method on one task; save(partial result) after each, so that a later failure loses nothing.
    done: (data fingerprint, {method: result}, inputs) of an interrupted run of the same arguments (--resume),
    kept instead of run again (main checked that its data and inputs, the student's weights and the h_G version,
    are these), or None. source: teacher_source's, for the teacher-feature methods. inputs: main's {student,
    embedding}; commit: the code's. checked: (file_stamps, fingerprint) of the task's data where main took them
    already, or None."""
    _, done, done_inputs = done or (None, {}, None)
    n_out = tasks.output_size(task, data)
    # a task none of whose methods reads teacher features runs no teacher on its images
    unsup, embedding, g_dim, teachers = source if needs_teachers(task, methods, args) else (None, None, None, [])
    # one stat of each file, for the fingerprint and every task cache
    stamps, data_fp = checked or (file_stamps(*task_files(data)), None)
    data_fp = data_fp or fingerprint(data, stamps)
    # what the results are of beside the arguments and data (h_G only where the task reads it); kept results
    # recorded without them stay of unknown inputs, not stamped with these
    inputs = {**inputs, "embedding": inputs["embedding"] if unsup else None}
    inputs = inputs if not done or done_inputs else None
    align = align_of(task, args)
    cache, wide = task_cache(data, teachers, args, device, log, align, stamps=stamps), None
    found = cache.found
    missed = int((~found).sum())
    m = write_missed(cache, run / f"missed_faces-{task.name}.tsv")
    log.info(f"{task.name}: {len(data.samples)} images, {missed} without a usable face (rule of section 4.1 "
             f"applied: {m.kinds()}, listed in "
             f"missed_faces-{task.name}.tsv), {len(data.splits)} split(s), protocol: {task.protocol}")
    y, lo_hi = targets(task, data) if task.kind not in ("verification", "landmarks") else (None, None)
    splits = data.splits[: args.max_splits] if args.max_splits else data.splits
    # Every choice (epochs, best teacher, subset) is made on validation faces, never on the test ones.
    groups = [s.group for s in data.samples] if task.protocol.startswith("leave-one") else None
    carved = [tasks.with_validation(s, i, groups, args.seed, args.val_frac) for i, s in enumerate(splits)]
    splits, selection = [s for s, _ in carved], carved[0][1] if carved else ""
    # flags that a task's own protocol leaves unread: said, not silently ignored
    if args.max_splits > len(data.splits):
        log.warning(f"warning: --max-splits {args.max_splits}: {task.name} has {len(data.splits)} split(s), all run")
    if args.val_frac != parse_args([]).val_frac and carved and all(s.val is not None and len(s.val)
                                                                   for s in data.splits[:len(splits)]):
        log.warning(f"warning: --val-frac {args.val_frac:g} is not used: {task.name}'s protocol has its own "
                    f"validation split")
    for s in splits if task.kind != "verification" else []:  # LFW trains on the other folds' identities
        if found[s.train].sum() < 2:  # nothing to learn from, and batch norm cannot train on one image
            raise SystemExit(f"error: {task.name}: {int(found[s.train].sum())} face(s) found among the "
                             f"{len(s.train)} training images of split {s.name!r}, fewer than 2; see "
                             f"{run / f'missed_faces-{task.name}.tsv'} for why")
    if task.kind == "verification":
        selection = "the folds that pick each fold's threshold (never the tested fold)"
    # The concat baseline's MLP has G's encoder layers (Table 6), ending at h_G's width.
    g_widths = fusion.layer_widths(unsup.dim, g_dim) if unsup else None
    results, shared = {}, {}  # shared: the task's teacher features, read once for all its methods
    out = {"task": task.name, "data": data_fp, "metric": task.metric, "protocol": task.protocol,
           "seed": args.seed, "n_images": len(data.samples),
           "missed_faces": missed, "splits_run": len(splits), "splits_total": len(data.splits),
           "validation": selection, "skipped_by_reader": len(data.skipped), "inputs": inputs, "results": results}
    if data.counts:  # the reader's own filters (AffectNet's codes 8-10, IMDb-WIKI's rules): how many rows each took
        out["reader_counts"] = dict(data.counts)
    if unsup:  # what the teacher-feature columns are of
        out["teacher_cache"], out["embedding"] = str(unsup.path), embedding
    for method in methods:
        if method == "multitask":
            continue  # one joint model over every task: main() runs it once all tasks are read
        if method in done:
            results[method] = done[method]
            continue
        # only from --method all: a named method a task cannot take stopped the run before any work
        if why := unavailable(task, method, args.kd_teacher):
            results[method] = {"metric": task.metric, "value": "n/a", "note": why}
            continue
        if task.kind == "landmarks" or (task.kind == "verification" and method in kd.VERIFICATION_METHODS):
            teacher = (task_cache(data, build_teachers([kd.kd_teacher(task, args)], device), args, device,
                                  log, align, stamps=stamps) if method == "kd" else None)
            results[method] = {**kd.run(task, data, cache, method, args, device, teacher), "commit": commit}
            log.info(f"{task.name} {method}: {results[method]['metric']} = {results[method]['value']:.4f}")
            save(out)
            continue
        if method == "etl":  # models an interrupted run left in this folder are not this run's (prune.finish
            shutil.rmtree(Path(args.run_dir) / "etl" / task.name, ignore_errors=True)  # keeps a folder's first)
        if method == "kd":  # a classification or regression task: the teacher's own answers, from its features
            name = kd.kd_teacher(task, args)
            teacher = task_cache(data, build_teachers([name], device), args, device, log, align, stamps=stamps)
            features = kd.soft_targets(task, data, teacher, lo_hi, args.kd_temperature, name)
        else:
            features = method_features(method, cache, unsup, embedding, args, device, student_cfg, shared)
            if not any(m in TEACHER_FEATURE_METHODS for m in methods[methods.index(method) + 1:]):
                shared.clear()  # the last method to read them has its own copy: not held through etl's training
        if task.kind == "verification":
            results[method] = verification(task, data, features, found, args.max_splits or None)
        else:
            images = cache
            if fine_tunes_teacher(method, args):
                images = wide = wide or teacher_crops(data, cache, args, device, log, align, stamps)
            results[method] = supervised(task, method, features, images, y, lo_hi, splits, found, n_out, args,
                                         device, student_cfg, log, g_widths)
        results[method].update(selection=selection, commit=commit)
        log.info(f"{task.name} {method}: {results[method]['metric']} = {results[method]['value']:.4f}"
                 + (f" ({results[method]['chosen']})" if results[method].get("chosen") else ""))
        save(out)
    return out


# Arguments that change no result: where the run is, what it runs on and how fast.
NOT_RESULTS = {"resume", "run_dir", "run_folder", "device", "workers", "argv", "script", "cwd", "environment",
               "started_by", "cache_dir", "batch_features"}  # (a task cache's features do not depend on either)


def resumed_results(args, aligns=frozenset()) -> dict:
    """{task: {method: result}} of the interrupted run in --run-dir, after checking that it ran with these
    arguments (its args.json): a result of other settings must not sit in one table with these."""
    run = Path(args.run_dir)
    if not (run / "args.json").is_file() and not (run / "report.json").is_file():
        return {}  # stopped before it wrote anything (or never started): every (task, method) runs
    try:
        old = json.loads((run / "args.json").read_text())
        # stopped before its first result: the arguments are still checked, then everything runs
        report = json.loads((run / "report.json").read_text()) if (run / "report.json").is_file() else []
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --resume: cannot read the run in {run} ({e}); start it afresh in another --run-dir")
    if old.get("script", "transfer") != "transfer":  # its flags are another script's: no list of them all
        raise SystemExit(f"error: --resume: {run} holds a {old['script']}.py run, not a transfer.py one: give "
                         f"transfer.py a folder of its own")
    old, now = comparable(args, old, parse_args([]))  # feats/tasks there is /x/feats/tasks here, resumed elsewhere
    if old.get("tasks") and now.get("tasks"):
        old["tasks"], now["tasks"] = tasks_from(old["tasks"], old.get("cwd", "")), tasks_from(now["tasks"], "")
    if now["align"] is None and {old["align"]} == set(aligns):  # recorded before each task had its own: the same
        old["align"] = None
    if old["embedding"] is None and now["embedding"] is not None:  # recorded unresolved: it meant the cache's
        try:  # default h_G (the one fuse.py wrote last), not the student's, which is taken now
            old["embedding"] = next(iter(FeatureCache(args.teacher_cache).embedding_names()), None)
        except (OSError, CacheMismatch):
            pass
    differ = sorted(k for k in set(old) | set(now) if k not in NOT_RESULTS and old.get(k) != now.get(k))
    if differ:
        raise SystemExit(f"error: --resume: {run} ran with other arguments ("
                         + "; ".join(f"--{k.replace('_', '-')} {old.get(k)!r} there, {now.get(k)!r} now"
                                     for k in differ)
                         + "): give the same ones, or start afresh in another --run-dir")
    # multitask's columns come from one joint model over every task, run again whole on a resume
    return {r["task"]: (r.get("data"), {m: v for m, v in r.get("results", {}).items() if not m.startswith("multitask")},
                        r.get("inputs"))
            for r in report}


def changed(task_name: str, kept: dict, then: dict | None, now: dict) -> None:
    """Refuse a resume whose kept results are of other inputs than these under the same arguments: a student
    distilled again into the same run folder, an h_G that fuse.py wrote anew (their results would be the old
    ones' beside the new ones')."""
    diff = [k for k, v in now.items() if kept and None not in (v, (then or {}).get(k)) and then[k] != v]
    if diff:
        raise SystemExit(f"error: --resume: {' and '.join('the student' if k == 'student' else 'h_G' for k in diff)}"
                         f" changed since the interrupted run ("
                         + "; ".join(f"{k} {then[k][:16]} then, {now[k][:16]} now" for k in diff)
                         + f"): {task_name}'s kept results would sit beside results of other inputs; start afresh in "
                         f"another --run-dir")


def fingerprint(data, stamps=None) -> str:
    """What a task's results are of: its files (names, sizes, times: its task caches' list hash; stamps: their
    file_stamps, when already taken), each sample's label and the splits."""
    h = hashlib.sha1(list_hash(*task_files(data), stamps).encode())
    h.update(json.dumps([s.label for s in data.samples], default=lambda a: np.asarray(a).tolist()).encode())
    for s in data.splits:
        for part in (s.train, s.val, s.test):  # each part's length first: a face moved across a border shows
            part = np.zeros(0, np.int64) if part is None else np.asarray(part, np.int64)
            h.update(np.int64(len(part)).tobytes() + part.tobytes())
    return h.hexdigest()[:16]


def student_config(args, methods) -> dict | None:
    """The student's config (architecture, width, input size) for the methods that use it.

    finetune and frozen need the distilled student itself; scratch only its architecture, so without
    a student it takes the default one (the paper's 2.2 M-parameter student with a 1024-wide output)."""
    need = [m for m in methods if m in ("finetune", "frozen", "kd") or (m == "etl" and args.etl_base == "student")
            or (m == "multitask" and args.backbone == "student")]
    path = Path(args.student)
    have = student_file(path).is_file()
    if need and not have:
        # An existing folder without a student (a fuse.py feature cache passed as --student, say) is no place
        # to write one: the hint then sends the new student to a run folder of its own.
        out = Path("runs/distill") if path.exists() else path
        what = ("is a fuse.py feature cache, not a student" if (path / "manifest.json").is_file()
                else "holds no student" if path.exists() else "does not exist")
        raise SystemExit(f"error: --method {','.join(need)} needs the distilled student, {path} "
                         f"(a student.safetensors or a distill.py run folder holding one), which {what}: "
                         f"make it with `python distill.py --cache {args.teacher_cache or DEMO_CACHE} --run-dir {out}`"
                         + (f" and pass --student {out}" if out != path else "") + ", or pass --student")
    scratch = "scratch" in methods or ("multitask" in methods and args.backbone == "scratch")
    if have and (need or scratch):
        return load_student(path)[1]
    if scratch and path != STUDENT:  # a --student given and mistyped: its architecture, not the default's, was meant
        raise SystemExit(f"error: --student {path} {'holds no student' if path.exists() else 'does not exist'} "
                         f"(scratch trains its architecture from random init); leave --student out to train the "
                         f"default student architecture")
    if scratch:
        return {**DEFAULT,
                "note": f"scratch: no student at {path}; the default student architecture is trained from random init"}
    return None


def method_features(method, cache, unsup, name, args, device, student_cfg, shared):
    """The fixed features a method reads: a tensor, or {candidate name: tensor} for the selections. shared: a dict
    kept over one task's methods, which then read one copy of the task's teacher features."""
    if method in ("finetune", "scratch"):
        return None
    if method == "etl":  # ratio 0 is plain finetune with the same protocol, the reference of every ratio
        return {f"{r:g}": r for r in [0.0, *etl_ratios(args.prune)]}
    if method == "pcnn":
        names = [t["name"] for t in unsup.teachers]
        torch_teachers = {n: None for n in names if REGISTRY.get(n) and REGISTRY[n].runtime == "torch"}
        if not torch_teachers:
            raise SystemExit(f"error: pcnn fine-tunes a PyTorch teacher; none among {names}")
        return torch_teachers
    if method == "frozen":
        return student_embeddings(cache, args, device, student_cfg)
    tf = shared["teachers"] = shared.get("teachers") or TeacherFeatures(cache, unsup, name)
    names = [t["name"] for t in unsup.teachers]
    if method == "concat":
        return tf.subset(names)
    if method == "fused":
        g, _ = fusion.load(unsup.embedding_dir(name) / "G.safetensors")
        with torch.no_grad():
            return g.encode(tf.subset(names))
    if method == "pca":
        _, meta = unsup.embedding(name)
        pca = fusion.build("pca", unsup.dim, meta["dim"]).to(device)
        data = fusion.Standardised(unsup, device, unsup.input_stats(name))  # tf's units
        split = unsup.embedding_dir(name) / "split.npz"  # G's training faces, centred in these units
        # the axes are kept in the task cache folder: at 4.12 M faces each fit is a pass over the fuse cache
        pca.fit_like(data, np.load(split)["train"] if split.exists() else np.flatnonzero(unsup.found),
                     store=args.cache_dir)
        return pca.cpu().encode(tf.subset(names))
    if method == "bt":
        return Subsets(tf, [(n,) for n in names])
    if method == "bct":
        subsets = [c for r in range(1, len(names) + 1) for c in itertools.combinations(names, r)]
        return Subsets(tf, subsets[: args.max_subsets] if args.max_subsets else subsets)
    raise SystemExit(f"error: unknown method {method!r}: choose from {', '.join(METHODS)}")


def supervised(task, method, features, cache, y, lo_hi, splits, found, n_out, args, device, student_cfg, log,
               g_widths=None):
    y_true = decode_labels(task, y.numpy(), lo_hi)
    candidates = features if isinstance(features, Mapping) else {None: features}
    outs, vals, search = {}, {}, {}
    for name, feats in candidates.items():
        outs[name], vals[name] = [], []
        for split in tqdm(splits, desc=f"{method} {name or ''}".strip(), unit="split", disable=None, leave=False):
            if method in ("finetune", "scratch", "pcnn", "etl", "kd"):
                out, vs = run_on_images(task, cache, y, lo_hi, split, found, n_out, args, device, student_cfg,
                                        method, log, teacher=name, ratio=feats if method == "etl" else None,
                                        soft=feats if method == "kd" else None)
            else:
                out, vs = run_on_features(task, feats, y, lo_hi, split, found, n_out, args,
                                          widths=g_widths if method == "concat" else None)
            outs[name].append(tasks.missed_face_rule(task, out, ~found[split.test], lo_hi))
            vals[name].append(vs)
        search[name] = {"value": pooled_score(task, splits, outs[name], y_true), "val": mean_val(vals[name])}
    # Each split picks its candidate on its own validation faces: with several splits (leave-one-person-out),
    # one pick for all by the mean validation score would let every split's test person, which sits in the
    # other splits' validation sets, take part in the choice.
    picks = []
    for i in range(len(splits)):
        if method == "etl":  # not the best score: the smallest network that keeps the score, on validation
            ratio, rule = prune.choose({feats: {"val": vals[n][i]} for n, feats in candidates.items()},
                                       task.metric not in metrics.LOWER_IS_BETTER, args.etl_keep)
            picks.append((f"{ratio:g}", rule))
            continue
        # one without a validation score (no validation face found) cannot win over one that has it
        best = None
        for name in candidates:
            v = vals[name][i]
            if best is None or (v is not None and (vals[best][i] is None or metrics.better(task.metric, v, vals[best][i]))):
                best = name
        picks.append((best, None))
    names = [n for n, _ in picks]
    chosen_outs = [outs[n][i] for i, n in enumerate(names)]
    chosen_vals = [vals[n][i] for i, n in enumerate(names)]
    entry = {"metric": task.metric, "value": pooled_score(task, splits, chosen_outs, y_true),
             "per_split": [score(task, o, y_true[sp.test]) for o, sp in zip(chosen_outs, splits)],
             "val": mean_val(chosen_vals), "chosen": names[0] if len(set(names)) == 1 else ",".join(map(str, names)),
             "n_test": int(sum(len(sp.test) for sp in splits)),
             "missed_test": int(sum((~found[sp.test]).sum() for sp in splits))}
    if len(set(names)) > 1:
        entry["chosen_per_split"] = names
    if missing := sum(v is None for v in chosen_vals):  # splits whose validation faces were all missed
        entry["splits_without_val"] = missing
    if method == "etl":
        entry["rule"] = prune.rule_line(picks)
    if len(candidates) > 1 and method != "etl" and any(v is None for v in chosen_vals):
        entry["note"] = "a split without a validation score shows its first candidate: nothing was chosen there"
    if len(candidates) > 1:
        entry["search"] = search  # every candidate's score, for the record of the brute-force search
    if method == "kd":  # the teacher alone, on the same test images and missed-face rule
        missed = ~features.ok.numpy()
        teacher = [tasks.missed_face_rule(task, features.preds[sp.test], missed[sp.test], lo_hi) for sp in splits]
        entry["teacher"], entry["teacher_name"] = pooled_score(task, splits, teacher, y_true), features.teacher
        what = f"T {features.temperature:g}; " if task.kind == "classification" else ""
        mapped = (" (its answer among the task's classes: a teacher class the task lacks is left out)"
                  if task.kind == "classification" else "")
        entry["note"] = (f"teacher {features.teacher}'s own prediction{mapped}: {task.metric} {entry['teacher']:.4f} "
                         f"on the same test images; {what}kd weight {args.kd_weight}")
    return entry


def pooled_score(task, splits, outs, y_true) -> float:
    """Leave-one-out protocols pool every held-out prediction before scoring (the usual FG-NET MAE)."""
    return float(metrics.pooled(metrics.METRICS[task.metric], [sp.test for sp in splits], outs, y_true))


def mean_val(values) -> float | None:
    return float(np.mean(values)) if values and all(v is not None for v in values) else None


def verification(task, data, features, found, max_folds: int | None = None) -> dict:
    """LFW's protocol on embeddings; with max_folds (--max-splits) only the first folds are tested, as the
    methods that train a model per fold do, so that one report row compares the same test pairs."""
    a, b, same, folds = tasks.pair_arrays(data)
    candidates = features if isinstance(features, Mapping) else {None: features}
    search, per_fold = {}, {}
    for name, feats in candidates.items():
        if not isinstance(feats, torch.Tensor):
            raise SystemExit(f"error: {task.name}: verification uses embeddings; fine-tuning methods need an identity "
                             f"training set first (use --method frozen, fused, concat, pca, bt or bct)")
        s = metrics.pair_scores(F.normalize(feats.float(), dim=1).numpy(), a, b, found)  # missed: NaN, wrong
        per_fold[name] = metrics.verification_per_fold(s, same, folds)
        accs, fits = (v[:max_folds] for v in per_fold[name])
        search[name] = {"value": float(accs.mean()), "std": metrics.fold_std(accs), "val": float(fits.mean())}
    # Each fold picks its candidate on the folds that set its threshold: one pick for all folds by the mean
    # of those accuracies would count every tested pair (each pair sits in nine folds' threshold sets).
    tested = np.unique(folds)[:max_folds]
    names = [max(candidates, key=lambda n: per_fold[n][1][k]) for k in range(len(tested))]
    accs = np.array([per_fold[n][0][k] for k, n in enumerate(names)])
    in_test = np.isin(folds, tested)
    best = {"metric": "verification_accuracy", "value": float(accs.mean()), "std": metrics.fold_std(accs),
            "se": metrics.standard_error(accs),
            "chosen": names[0] if len(set(names)) == 1 else ",".join(map(str, names)),
            "val": float(np.mean([per_fold[n][1][k] for k, n in enumerate(names)])), "n_test": int(in_test.sum()),
            "missed_test": int((~(found[a] & found[b]))[in_test].sum())}
    if len(set(names)) > 1:
        best["chosen_per_split"] = names
    if len(candidates) > 1:
        best["search"] = search
    return best


def report(all_results: list[dict], methods, run: Path, log) -> str:
    headers = ["Knowledge", "Metric", "missed", "test"] + methods
    rows = []
    for r in all_results:
        tested = sorted({res["n_test"] for res in r["results"].values() if res.get("n_test") is not None})
        # (formatted here: tabulate leaves the numbers of a column that also holds an n/a unrounded)
        rows.append([r["task"], r["metric"], f"{r['missed_faces']}/{r['n_images']}", "/".join(map(str, tested))]
                    + [f"{v:.4f}" if isinstance(v := r["results"][m]["value"], float) else v for m in methods])
    md = tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True,
                  colalign=["left"] * 3 + ["right"] * (1 + len(methods)))

    def chosen_line(r, m, res):  # a pick with no validation score (its validation faces all missed) was no choice
        missing, splits = res.get("splits_without_val", 0), len(res.get("per_split") or [None])
        verb, where = "chose", ", on validation"
        if r["metric"] == "verification_accuracy":
            where = ", on the threshold folds"
        elif res.get("val") is None and 0 < missing < splits:
            where += f" ({missing} of {splits} splits had no validation score: nothing chosen there)"
        elif res.get("val") is None and missing:
            verb, where = "shows", " (no validation score: its validation faces were all missed; nothing was chosen)"
        searched = f" of {len(res['search'])} searched (all scores in report.json)" if res.get("search") else ""
        each = " (each split on its own)" if res.get("chosen_per_split") else ""
        return f"- {r['task']} {m}: {verb} {res['chosen']}{searched}{where}{each}"
    chosen = [chosen_line(r, m, res) for r in all_results for m in methods if (res := r["results"][m]).get("chosen")]
    extra = [f"- {r['task']} {m}: {r['results'][m]['note']}" for r in all_results for m in methods
             if r["results"][m].get("note")]
    read = [f"- {r['task']}: the reader skipped {r.get('skipped_by_reader', 0)} file(s)"
            + (f" (listed in skipped-{r['task']}.tsv)" if r.get("skipped_by_reader") else "")
            + (f"; its filters: {r['reader_counts']}" if r.get("reader_counts") else "")
            for r in all_results if r.get("skipped_by_reader") or r.get("reader_counts")]
    notes = "\n".join([f"- {r['task']}: {r['protocol']}; {r['splits_run']}/{r['splits_total']} splits run; "
                        f"epochs and candidates chosen on {r['validation']}"
                        + (f"; training seed {r['seed']}" if r.get("seed") is not None else "")
                        for r in all_results] + read + chosen + extra)
    # The paper's tables give percent: 0.9790 here is its 97.90
    units = ("- every value is a test score (faces or pairs no choice looked at; `test`: how many, over the splits "
             "run); lower is better for mae, nme and error_rate, higher for the others; units: accuracy, error_rate and "
             "verification_accuracy are fractions (x 100 = the paper's %); "
             "mae is in the label's units (years, PSPI); nme is a fraction of the normalising distance; "
             "verification's standard error over folds (LFW's S_E) is `se` in report.json")
    text = f"{md}\n\n{notes}\n{units}\n"
    write_text(run / "report.md", text)
    write_json(run / "report.json", all_results)
    log.info("\n" + text)
    return text


def joint(read, unlabelled, all_results, methods, args, device, log) -> list[str]:
    """The multitask method: one model over every task (2MD-MTL); its entries join each task's results.
    unlabelled: the --pseudo-label images (TaskData), for data distillation, or None."""
    crop = CROP_SIZE if args.backbone in ("student", "scratch") else CANON  # a teacher's own input: teacher_crops
    jobs = [(task, data, task_cache(data, [], args, device, log, align_of(task, args), crop)) for task, data, _ in read]
    if unlabelled is not None:
        unlabelled = (unlabelled, task_cache(unlabelled, [], args, device, log, args.align or "mtcnn", crop))
        args.pseudo_epochs = args.pseudo_epochs or args.epochs
    results = multitask.run_joint(jobs, args, device, log, unlabelled)
    for r in all_results:
        r["results"].update(results[r["task"]])
    if unlabelled:
        methods = [*methods, "multitask+pseudo"]
    return methods


def etl_ratios(text: str) -> list[float]:
    try:
        ratios = sorted({float(r) for r in text.split(",") if r.strip()})
    except ValueError:
        raise SystemExit(f"error: --prune: give comma-separated fractions such as 0.5,0.9 (got {text!r})")
    if not ratios or not all(0 < r < 1 for r in ratios):
        raise SystemExit(f"error: --prune: every ratio is a fraction of filters removed, 0 < ratio < 1 (got {text!r})")
    return ratios


def task_named(name: str) -> tasks.Task:
    try:
        return tasks.get_task(name)
    except KeyError as e:
        raise SystemExit(f"error: {e.args[0]} (see python transfer.py --list)")


def etl_base_problem(name: str) -> str | None:
    """Why --etl-base `name` cannot be pruned (None: it can), from the teacher registry."""
    if name == "student":
        return None
    spec = REGISTRY.get(name)
    choices = f"ETL prunes the student or a PyTorch teacher of standard layers ({', '.join(PRUNABLE_TEACHERS)})"
    if spec is None:
        return f"--etl-base: unknown teacher {name!r}; {choices}"
    if spec.runtime != "torch":
        return f"--etl-base: {name} runs on {spec.runtime}, not PyTorch; {choices}"
    if spec.reference:
        source = {"onnx": "ONNX", "tflite": "TFLite"}.get(spec.arch, spec.arch)
        return (f"--etl-base: {name} is ported to PyTorch from {source} and keeps its weights or per-channel "
                f"constants outside PyTorch's standard layers, so its filters cannot be cut; {choices}")
    return None


# Flags that only a method reads: given (not left at their default) without it, they would be ignored.
FLAG_METHODS = {"prune": "etl", "etl_base": "etl", "etl_images": "etl", "etl_keep": "etl", "backbone": "multitask",
                "pseudo_epochs": "multitask", "pseudo_threshold": "multitask", "pseudo_agreement": "multitask",
                "kd_teacher": "kd", "kd_weight": "kd", "kd_temperature": "kd", "max_subsets": "bct",
                "embedding": TEACHER_FEATURE_METHODS, "teachers_config": TEACHER_METHODS}

# Flags that a method reads on some tasks and not on others, and what each is, for the error of one that no
# (task, method) of a run reads.
PAIR_FLAGS = {
    "epochs": "the epochs of a network trained on the images (finetune, scratch, pcnn, etl, multitask, kd; on a "
              "landmark task frozen too)",
    "head_epochs": "the epochs of an MLP head on fixed features (frozen, fused, concat, pca, bt, bct), which "
                   "verification does not train (it compares their embeddings) and a landmark task trains frozen "
                   "for --epochs",
    "hidden": "the MLP head's width; verification compares the embeddings of frozen, fused, concat, pca, bt and "
              "bct (no head), and concat's head takes its widths from G's layers",
    "kd_temperature": "kd's softmax temperature on classes (on a regression its term is the distance to the "
                      "teacher's expected value)",
    **dict.fromkeys(("detect_size", "smallest_face", "min_face_prob"),
                    "for the face detector, which --align none (or each task's own default) does not run"),
}


def pair_reads(task, method, args) -> set[str]:
    """The flags of PAIR_FLAGS that `method` reads on `task` (none where it is shown n/a)."""
    reads = set(DETECTOR_FLAGS) if align_of(task, args) == "mtcnn" else set()
    if unavailable(task, method, args.kd_teacher):
        return reads
    if method == "multitask" or task.kind == "landmarks" or (task.kind == "verification"
                                                             and method in kd.VERIFICATION_METHODS):
        return reads | {"epochs", "hidden"}  # a joint model trained for --epochs (kd.run, multitask)
    if task.kind == "verification":  # embeddings compared by cosine
        return reads
    reads |= {"head_epochs" if method in HEAD_METHODS else "epochs"} | ({"hidden"} if method != "concat" else set())
    return reads | ({"kd_temperature"} if method == "kd" and task.kind == "classification" else set())


def unread_flags(args, methods, tasks_run) -> None:
    """A flag given (not left at its default) that no (task, method) of the run reads stops it: it would be
    ignored, and recorded in args.json as if it had been used."""
    defaults, kept = vars(parse_args([])), resumed_value(args, args.run_dir)
    read = {f for task in tasks_run for m in methods for f in pair_reads(task, m, args)}
    if args.pseudo_label is not None and (args.align or "mtcnn") == "mtcnn":  # its unlabelled faces are detected
        read |= set(DETECTOR_FLAGS)
    for flag, what in PAIR_FLAGS.items():
        value = getattr(args, flag)
        if value != defaults[flag] and flag not in read and not kept(flag):
            raise SystemExit(f"error: --{flag.replace('_', '-')} {value}: no method of this run reads it on its tasks "
                             f"({', '.join(t.name for t in tasks_run)}): it is {what}")


def check_flags(args, methods) -> None:
    """Flags that contradict each other or that the methods would ignore stop the run before any work."""
    if args.tasks and (args.task or args.data is not None):
        raise SystemExit("error: --tasks gives every task with its folder (NAME=DIR): drop --task and --data, or "
                         "give one task with --task and --data")
    if args.data is not None and args.task in (None, DEMO_TASK):  # the demo task is embedded: DIR would go unread
        raise SystemExit(f"error: --data: give --task NAME, the task of that folder (see --list); the demo task "
                         f"{DEMO_TASK} is embedded and reads no folder")
    if args.pseudo_label is not None and "multitask" not in methods:
        raise SystemExit("error: --pseudo-label needs --method multitask (data distillation trains the multitask "
                         "model; with one --task it is the single-task baseline)")
    if args.epochs < 1 or args.head_epochs < 1:
        raise SystemExit(f"error: --epochs and --head-epochs must be 1 or more (got {args.epochs} and "
                         f"{args.head_epochs}): a network that never trained would be reported")
    if "multitask" in methods and (why := multitask.backbone_problem(args.backbone)):
        raise SystemExit(f"error: {why}")
    if args.pseudo_label is not None and not args.pseudo_label.is_dir():
        raise SystemExit(f"error: --pseudo-label {args.pseudo_label}: no such folder")
    if args.max_splits is not None and args.max_splits < 0:
        raise SystemExit(f"error: --max-splits {args.max_splits}: give 0 (every split) or more")
    defaults, kept = vars(parse_args([])), resumed_value(args, args.run_dir)
    for flag, takers in FLAG_METHODS.items():
        if kept(flag):
            continue
        takers = (takers,) if isinstance(takers, str) else takers
        if getattr(args, flag) != defaults[flag] and not set(takers) & set(methods):
            raise SystemExit(f"error: --{flag.replace('_', '-')} {getattr(args, flag)} is for --method "
                             f"{' or '.join(takers)}, which this run does not have")
    if args.pseudo_label is None and any(getattr(args, f) != defaults[f] for f in ("pseudo_threshold",
                                                                                    "pseudo_agreement", "pseudo_epochs")):
        raise SystemExit("error: --pseudo-threshold, --pseudo-agreement and --pseudo-epochs are for data distillation: "
                         "give --pseudo-label DIR")
    if not 0 < args.val_frac < 1:
        raise SystemExit(f"error: --val-frac {args.val_frac:g}: a fraction between 0 and 1")
    if args.pseudo_epochs is not None and args.pseudo_epochs < 1:
        raise SystemExit(f"error: --pseudo-epochs {args.pseudo_epochs}: 1 or more")
    if args.batch < 2 and any(m in NETWORK_METHODS for m in methods):
        raise SystemExit(f"error: --batch {args.batch}: the networks trained on images (batch norm) need 2 or more")
    if "kd" in methods and not (math.isfinite(args.kd_temperature) and args.kd_temperature > 0
                                and math.isfinite(args.kd_weight) and args.kd_weight >= 0):
        raise SystemExit(f"error: --kd-temperature must be a number above 0 and --kd-weight one of at least 0 (got "
                         f"{args.kd_temperature:g} and {args.kd_weight:g})")
    if "etl" in methods:
        etl_ratios(args.prune)  # a bad list fails now, not after the other methods ran
        if args.etl_images < 1:
            raise SystemExit(f"error: --etl-images {args.etl_images}: at least 1 training face scores the filters")
        if not 0 < args.etl_keep <= 1:
            raise SystemExit(f"error: --etl-keep {args.etl_keep:g}: a fraction above 0, at most 1 (0.995 keeps 99.5%)")
        if why := etl_base_problem(args.etl_base):
            raise SystemExit(f"error: {why}")


@holding_runs
def main(argv=None):
    args = parse_args(argv)
    if args.list:
        print(tasks.list_tasks_table())
        print(f"\nWithout --task / --tasks: {DEMO_TASK}, embedded ({demo_task.__doc__.split(':')[0]}: face vs "
              f"non-face, accuracy, a split per class, folder layout built in data/lfw_subset on first use)")
        print(f"Your own labelled data, no code: --task {tasks.user_kinds_text()}, with --data DIR")
        return
    one_process_only("transfer.py", "--run-dir (e.g. one task each)")
    if args.cache_dir.exists() and not args.cache_dir.is_dir():  # else a raw errno after the run folder is made
        raise SystemExit(f"error: --task-cache {args.cache_dir} is a file: name a folder")
    device = pick_device(args.device)
    named = [m.strip() for m in args.method.split(",") if m.strip()]
    # all: the first METHODS; beside it, kd or multitask come along (all,kd)
    methods = list(dict.fromkeys(m for n in named for m in (METHODS if n == "all" else [n])))
    if not methods:
        raise SystemExit(f"error: --method: name at least one of {', '.join(METHODS + EXTRA_METHODS)} or all")
    for m in methods:
        if m not in METHODS + EXTRA_METHODS:
            raise SystemExit(f"error: --method: unknown {m!r} (choose from {', '.join(METHODS + EXTRA_METHODS)} "
                             f"or all)")
    check_flags(args, methods)
    jobs = []
    if args.tasks:
        for item in args.tasks.split(","):
            name, _, folder = item.partition("=")
            if not folder:
                raise SystemExit(f"error: --tasks: give each task its folder as NAME=DIR (got {item!r})")
            jobs.append((task_named(name), Path(folder)))
        if len({t.name for t, _ in jobs}) < len(jobs):  # one report row per task: a second would run it twice
            raise SystemExit(f"error: --tasks names a task twice ({args.tasks})")
    elif args.task and args.task != DEMO_TASK:
        if args.data is None:
            raise SystemExit(f"error: --task {args.task} needs --data DIR; expected layout: "
                             f"{task_named(args.task).layout}")
        jobs.append((task_named(args.task), args.data))
    else:
        jobs.append(demo_task(write=False))
    # Everything that can be checked is checked before any work: a typo in the last task's folder, a method
    # a task cannot take or a bad --student must not cost the hours of the tasks before it.
    # (a method that came with `all` and that a task cannot take is shown n/a instead)
    why = [w for task, _ in jobs for m in methods if m in named and (w := unavailable(task, m, args.kd_teacher))]
    if (given := kd.per_task(args.kd_teacher)) and (other := sorted(set(given) - {t.name for t, _ in jobs})):
        why.append(f"--kd-teacher names {', '.join(other)}, not a task of this run ({', '.join(t.name for t, _ in jobs)})")
    if why:
        raise SystemExit("error: " + "\n       ".join(why))
    unread_flags(args, methods, [task for task, _ in jobs])
    if args.resume and not args.run_dir:
        raise SystemExit("error: --resume continues the run in the folder given by --run-dir: name it")
    if args.run_dir and (Path(args.run_dir) / "report.json").exists() and not args.resume:
        raise SystemExit(f"error: {args.run_dir} already holds a transfer run's report.json: pass another --run-dir, "
                         f"--resume to continue it, or delete that folder")
    read = []
    for task, root in jobs:
        if task.name == DEMO_TASK:  # its folder written once the checks above passed
            demo_task(root)
        data = task.loader(root, {})
        if task.kind == "verification" and not data.pairs:
            raise SystemExit(f"error: {task.name}: no verification pairs were read from {root}")
        read.append((task, data, root))
        if "multitask" in methods and (why := multitask.task_problem(task, data)):
            raise SystemExit(f"error: {why}")
        if "kd" in methods and task.kind == "classification":  # the teacher's classes fit the task's
            kd.class_map(task, data, REGISTRY[kd.kd_teacher(task, args)].answer)
    unlabelled = None
    if args.pseudo_label is not None:  # listed once, here, before any work
        from common.images import list_images

        root = args.pseudo_label
        with kept_warnings() as early:  # images the listing leaves out: named in the run's log.txt too
            unlabelled = tasks.TaskData([tasks.Sample(str(root / p), None) for p in list_images(root)], [])
        if not unlabelled.samples:
            raise SystemExit(f"error: --pseudo-label {root} holds no image to label")
    try:  # read once: its config, its hash and every method's weights come from the same bytes
        student_sha = pin(args.student)
    except (FileNotFoundError, NotAStudent):  # said below where a method needs it
        student_sha = None
    student_cfg = student_config(args, methods)  # a missing student stops the run before its folder is made
    student_sha = student_sha if student_cfg and "note" not in student_cfg else None
    # the teacher-feature columns read the fusion the student learnt from, even when no method runs the student
    learnt_from = student_cfg or students_record(args)
    the_students_cache(args, learnt_from)
    task_aligns = {align_of(task, args) for task, _ in jobs}  # the unlabelled faces of --pseudo-label are detected
    detection_settings(args, student_cfg, task_aligns | ({args.align or "mtcnn"} if unlabelled else set()))
    source = teacher_source(args, list(dict.fromkeys(m for t, _ in jobs for m in needs_teachers(t, methods, args))),
                            device, learnt_from)  # (it fills --embedding, which a --resume compares)
    done = resumed_results(args, task_aligns) if args.resume else {}
    inputs = {"student": student_sha,
              "embedding": source[0].embedding_dir(source[1] or "ae").name if source[0] else None}
    checked = {}  # (stamps, fingerprint) of the resumed tasks' files, used again by their task caches
    for task, data, _ in read:  # before the run folder: a refused resume rewrites nothing
        if task.name in done and done[task.name][1]:
            then_data, kept, then = done[task.name]
            stamps = file_stamps(*task_files(data))  # one stat of each file
            checked[task.name] = stamps, fingerprint(data, stamps)
            if then_data not in (None, checked[task.name][1]):
                raise SystemExit(f"error: --resume: {task.name}'s data changed since the interrupted run (its files, "
                                 f"labels or splits): its results would sit beside results of other data; start "
                                 f"afresh in another --run-dir")
            changed(task.name, kept, then, inputs)
    run = make_run_dir(args.run_dir, "transfer", args)
    commit = environment().get("commit")  # each result's own: a resume may run newer code than the kept ones
    args.run_dir = run  # ETL writes its models there
    log = get_logger(run, "transfer", early if args.pseudo_label is not None else ())
    if args.resume and not done:  # a typo in --run-dir would otherwise cost a run unsaid
        log.info(f"--resume: no result in {run} yet: every task and method runs")
    if student_cfg and "note" in student_cfg:
        log.info(student_cfg.pop("note"))
    if source[0] and (why := pairing_warning(source[0], source[1], student_cfg)):  # when the student runs
        log.warning(why)
    all_results = []
    for task, data, _ in read:
        if data.skipped:  # every one of them listed: the log names three, a dataset may skip thousands
            write_reasons(run / f"skipped-{task.name}.tsv", ((s, f"not as the layout says: {task.layout}")
                                                             for s in data.skipped))
            log.info(f"{task.name}: {len(data.skipped)} files skipped by the reader (e.g. {data.skipped[:3]}; all in "
                     f"skipped-{task.name}.tsv)")
        if data.counts:
            log.info(f"{task.name}: the reader's counts: {data.counts}")
        if done.get(task.name, (None, {}, None))[1]:
            log.info(f"{task.name}: kept from the run resumed (not run again): {', '.join(done[task.name][1])}")
        all_results.append(evaluate_task(task, data, methods, args, device, run, log, student_cfg,
                                         save=lambda partial: write_json(run / "report.json", all_results + [partial]),
                                         done=done.get(task.name), source=source, inputs=inputs, commit=commit,
                                         checked=checked.pop(task.name, None)))
    if "multitask" in methods:
        methods = joint(read, unlabelled, all_results, methods, args, device, log)
    report(all_results, methods, run, log)
    if "etl" in methods:
        prune.etl_report(all_results, run, log, {r["task"]: r["metric"] not in metrics.LOWER_IS_BETTER
                                                 for r in all_results}, args.etl_base)
    log.info(f"run folder: {run}")


if __name__ == "__main__":
    run_main(main)

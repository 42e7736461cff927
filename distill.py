"""Step 2 of the paper (section 3.3): distil the fused embedding h_G into one light student CNN.
(Then `python distill.py embed --student RUN --data DIR --out emb.npy` embeds a folder of images with it:
`distill.py embed --help`.)

The student E^G_unique (common/student.py: ResNet-18 layout at 0.42 width, 2.2 M parameters with a
1024-wide h_G, as in the paper) maps an aligned face crop straight to an estimate of h_G, trained on
the faces of the feature cache that fuse.py wrote by minimising eq. (4), 1 - cos(h_G, student(x)).
Held-out faces are the ones fuse.py held out when it trained G. At the end the run folder gets the
held-out cosine and the reconstruction check of Table 5 (a decoder shaped like the paper-layout G, trained on the
student's embeddings to give back every teacher's h_i), beside G's own error.

--loss mt trains instead the one-step multitask model of section 3.4, E_MT = G~ o E_unique: the
student and a fresh decoder shaped like the paper-layout G (geometric widths), jointly, to reconstruct every
standardised h_i (eq. 3's MSE plus a 1 - cos term per teacher, averaged: our addition, so that a narrow
teacher counts), so the paper's two-step vs one-step comparison (Table 5, section 4.5) can be run on the
same faces.

  python distill.py                                        # the cache of `python fuse.py` (feats/demo)
  python distill.py --cache feats/faces --run-dir runs/s1                 # your own cache
  torchrun --nproc_per_node 4 distill.py --cache feats/faces --run-dir runs/s1   # several GPUs (DDP)
  python distill.py --cache feats/faces --run-dir runs/s1 --resume        # after a kill
  python distill.py embed --student runs/s1 --data DIR --out emb.npy # use the student
(--teacher-cache, --out and embed's --checkpoint, --images are the old spellings, still accepted.)
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn import functional as F

from common import fusion, plots, precision
from common.cache import FeatureCache, as_planned, hold_for_reading, open_files_warning, write_reasons
from common.checkpoint import (LEGACY_STATE_SUFFIX, STATE_SUFFIX, StateError, load_state, rng_state, save_state,
                               set_rng_state)
from common.facedata import AlignedFaces, EpochSampler, NoTargets, first, resize, to_device_pixels
from common.files import atomic_write, write_json, write_text
from common.progress import Progress, counted
from common.runs import (COUNT, LAST_RUN, NONNEGATIVE, POSITIVE, POSITIVE_INT, PROBABILITY, HelpFormatter, as_arg,
                         dist_info, get_logger, given_flags, hold, holding_runs, init_dist, leave_stops_to_the_parent,
                         make_run_dir, one_process_only, pick_device, resume_defaults, resumed_value, run_dir_problem,
                         run_main, write_args)
from common.student import (ARCHS, WIDTH, NotAStudent, build_student, load_student, n_params, pin, read_checkpoint,
                            save_student)
from kernels import cosine_distill_loss

LOSSES = ("cosine", "cosine+smoothl1", "mt")


class NonFiniteLoss(Exception):
    pass


EXPORTS = ("onnx", "torchscript")


def export_formats(text: str) -> list[str]:
    """--export's list, checked as the arguments are read: a typo must not wait for the end of training."""
    formats = [f.strip() for f in text.split(",") if f.strip()]
    for f in formats:
        if f not in EXPORTS:
            raise argparse.ArgumentTypeError(f"unknown format {f!r} (choose from {', '.join(EXPORTS)})")
    return formats


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="distill.py", description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--cache", "--teacher-cache", dest="teacher_cache", metavar="DIR", type=Path, default=Path("feats/demo"),
                   help="feature cache written by fuse.py (default: feats/demo, the cache of `python fuse.py`)")
    g.add_argument("--embedding", help="which fused embedding h_G of the cache to distil (default: the one fuse.py wrote last)")
    g.add_argument("--run-dir", "--out", dest="out", metavar="DIR", type=Path, help="run folder (default: runs/distill-demo for the demo cache, where "
                   "transfer.py looks, else runs/distill-TIME); --resume needs it, except on the demo cache")
    g.add_argument("--size", type=POSITIVE_INT, default=112,
                   help="side of the student's input crop. 112 is the face-recognition standard (ArcFace, "
                        "MobileFaceNet): enough for identity detail at a quarter of the cost of 224 "
                        "(the paper used 300x300 crops; --size 224 or 300 comes closer to it, from a cache "
                        "extracted with fuse.py --crop-size at least as large: a store of 128-pixel crops, fuse.py's "
                        "own size, would only be enlarged)")
    g.add_argument("--workers", type=COUNT, default=2,
                   help="DataLoader worker processes gathering crops from the cache's crop store (augmentation "
                        "runs per batch on the device)")
    g = p.add_argument_group("student")
    g.add_argument("--arch", default="resnet18w", choices=ARCHS,
                   help="resnet18w: ResNet-18 layout with channels times --width (paper size); resnet18: full width")
    g.add_argument("--width", type=float, default=WIDTH,
                   help=f"channel multiplier of resnet18w ({WIDTH}: 2.2 M parameters with a 1024-wide h_G)")
    g = p.add_argument_group("training")
    g.add_argument("--loss", default="cosine", choices=LOSSES,
                   help="cosine: eq. (4), 1 - cos(h_G, student); cosine+smoothl1: plus smooth-L1 on standardised "
                        "h_G (as in UNIC/Theia); mt: one-step E_MT = fresh paper-layout decoder o student, fitting "
                        "every standardised h_i (MSE + mean per-teacher cosine; sec. 3.4)")
    g.add_argument("--smoothl1-weight", type=NONNEGATIVE, default=1.0,
                   help="weight of the smooth-L1 term of cosine+smoothl1")
    g.add_argument("--epochs", type=int, default=40,
                   help="passes over the training faces (40: about a minute on the demo cache with 2 CPU cores)")
    g.add_argument("--steps", type=int, default=0, help="total optimizer steps (overrides --epochs when > 0)")
    g.add_argument("--batch", type=POSITIVE_INT, default=32, help="faces per step and per process")
    g.add_argument("--lr", type=POSITIVE, default=1e-3, help="peak AdamW learning rate (linear warm-up, cosine decay)")
    g.add_argument("--warmup", type=PROBABILITY, default=0.05, help="fraction of the steps spent warming up the lr")
    g.add_argument("--weight-decay", type=NONNEGATIVE, default=0.05, help="AdamW weight decay")
    g.add_argument("--seed", type=COUNT, default=0, help="seed of the init, the data order and the augmentations")
    g.add_argument("--log-every", type=int, default=50,
                   help="steps between loss checks and progress updates (the only host syncs of the loop)")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available), cpu, cuda, cuda:1 ...")
    g.add_argument("--amp", default="auto", choices=precision.CHOICES, help=precision.HELP)
    g.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"],
                   help="channels-last memory layout (auto: on a GPU only, where convolutions run faster with it)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic cuDNN kernels, so a resumed GPU run matches bit for bit (slower); "
                        "CPU runs always are")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--ckpt-every", type=int, default=200, help="checkpoint every N steps (and at the end)")
    g.add_argument("--keep", type=int, default=2, help="checkpoints kept in RUN/ckpt (older ones are deleted)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --run-dir (start fresh if there is none, so a "
                        "preemptible job can always pass it); the result equals an uninterrupted run. Flags not given "
                        "take the run's recorded values (--stop-at aside): `--resume --run-dir RUN` alone continues it")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in a --run-dir that already holds a run, deleting its checkpoints, metrics and "
                        "results (without it, and without --resume, such a folder is refused; a folder another run "
                        "is still writing into is refused either way)")
    g.add_argument("--stop-at", type=COUNT, default=0,
                   help="stop after this step as a killed job would, leaving its checkpoint (tests, time slots; "
                        "0: never)")
    g.add_argument("--inject-nan-at", type=COUNT, default=0, help="testing: make the loss of this step NaN (0: never)")
    g = p.add_argument_group("evaluation and export")
    g.add_argument("--no-eval", action="store_true", help="skip the held-out cosine and Table 5 check")
    g.add_argument("--recon-epochs", type=int, default=40, help="epochs of the Table 5 check decoder (as fuse.py's G)")
    g.add_argument("--recon-max-train", type=POSITIVE_INT, default=50000,
                   help="at most this many training faces (a seeded subset) embedded to fit the check decoder; "
                        "their h_i are held in memory (50000 x 5488 floats = 1.1 GB for the paper's teachers)")
    g.add_argument("--export", default="", type=export_formats,
                   help="formats to export the final student to: onnx,torchscript (comma list)")
    args = p.parse_args(argv)
    if args.resume and args.out:  # `--resume --run-dir RUN` alone: the rest as RUN ran
        args = resume_defaults(p, argv, args, Path(args.out), "distill", keep=("resume", "out", "stop_at", "overwrite"))
    # Values that would divide by zero hours in, train nothing, or make no Table 5 check: refused now.
    small = [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
             if k in ("epochs", "log_every", "ckpt_every", "keep", "recon_epochs", "recon_max_train", "batch",
                      "size") and v < 1]
    if args.steps < 0:
        p.error(f"--steps {args.steps}: give 0 (train --epochs) or a number of steps")
    kept = resumed_value(args, args.out)
    if args.smoothl1_weight != 1.0 and args.loss != "cosine+smoothl1" and not kept("smoothl1_weight"):
        p.error(f"--smoothl1-weight weighs the smooth-L1 term of --loss cosine+smoothl1, not of --loss {args.loss}: "
                f"drop it, or give --loss cosine+smoothl1")
    if not args.width > 0:  # 0 or less still builds: 1-channel layers, a few hundred parameters
        p.error(f"--width {args.width}: the channel multiplier must be above 0 ({WIDTH} is the paper's student)")
    if small:
        p.error(f"{', '.join(small)}: must be 1 or more")
    if args.resume and args.out is None and args.teacher_cache != Path("feats/demo"):  # the demo's is fixed
        p.error("--resume needs --run-dir, the folder of the run to continue")
    if args.resume and args.overwrite:  # (it resumed, deleting nothing)
        p.error("--resume continues the run in --run-dir, --overwrite deletes it to start afresh: give one of them")
    given = given_flags(p, argv)
    if args.arch == "resnet18" and args.width != 1.0 and "width" in given and not kept("width"):
        p.error(f"--width {args.width:g} scales --arch resnet18w; resnet18 is the full width (it would be ignored)")
    # given, it would go unread and be recorded in args.json as if used
    if args.steps > 0 and "epochs" in given and not kept("epochs"):
        p.error(f"--epochs {args.epochs}: --steps {args.steps} sets the length of training: give one of them")
    return args


# ---------------------------------------------------------------------------------------- the step
def make_loss(kind, cache, name, hG_mean, hG_std, device, smoothl1_weight=1.0):
    """loss(output, raw target rows) -> scalar; the targets arrive as stored in the cache."""
    if kind == "cosine":
        return lambda out, t: cosine_distill_loss(out, t)
    if kind == "cosine+smoothl1":
        mu = torch.tensor(hG_mean, dtype=torch.float32, device=device)
        # A dimension of h_G that barely varies on the training faces (G wider than the rank its training
        # faces give: 390 of the demo's 536) would, divided by its own spread, outweigh the rest millions of
        # times: no spread counts as less than a tenth of the typical (RMS) one.
        floor = 0.1 * float(np.sqrt(np.mean(np.square(hG_std))))
        sd = torch.tensor(np.maximum(hG_std, floor), dtype=torch.float32, device=device)
        return lambda out, t: (cosine_distill_loss(out, t)
                               + smoothl1_weight * F.smooth_l1_loss((out - mu) / sd, (t - mu) / sd))
    # mt: G's own objective (eq. 3, MSE on the standardised concatenation, with the per-teacher weights of a
    # G fitted with --balance) plus one cosine term per teacher, averaged, so that a narrow teacher counts as
    # much as a 2048-wide one does.
    mean, std = (torch.tensor(a, dtype=torch.float32, device=device) for a in cache.input_stats(name))
    slices = list(cache.slices().values())
    weight = g_weight(cache, name)
    weight = None if weight is None else weight.to(device)

    def mt_loss(out, t):
        z = (t - mean) / std
        cos = sum(cosine_distill_loss(out[:, sl], z[:, sl]) for sl in slices) / len(slices)
        return (F.mse_loss(out, z) if weight is None else fusion.weighted_mse(out, z, weight)) + cos
    return mt_loss


def g_weight(cache, name) -> torch.Tensor | None:
    """The per-dimension weights of G's loss (fuse.py --balance), or None where G weighs every dimension alike."""
    weight = getattr(fusion.load(cache.embedding_dir(name) / "G.safetensors")[0], "weight", None)
    return None if weight is None or bool((weight == 1).all()) else weight


def train_step(model, pixels, target, loss_fn, opt, amp_dtype=None, scaler=None, channels_last=False):
    """One forward/backward/update on a batch of uint8 pixels; returns the loss (a 0-d tensor)."""
    device = next(model.parameters()).device
    pixels = pixels.to(device, non_blocking=True)
    if channels_last:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    target = target.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        out = model(pixels)
    loss = loss_fn(out.float(), target)
    precision.backward_step(loss, opt, scaler)
    return loss.detach()


def lr_at(step, total, peak, warmup):
    n_warm = max(1, int(round(warmup * total)))
    if step < n_warm:
        return peak * (step + 1) / n_warm
    return 0.5 * peak * (1 + math.cos(math.pi * (step - n_warm) / max(1, total - n_warm)))


# ------------------------------------------------------------------------------------- checkpoints
# A checkpoint is step_N.safetensors (weights + config) and step_N.state.safetensors (optimizer, scaler,
# RNG; common/checkpoint.py: no pickle, so resuming a run folder from elsewhere runs no code), then
# latest.json naming them, written last: a kill at any moment leaves the previous one usable.
def save_checkpoint(run, step, student, decoder, opt, scaler, cfg, keep, epoch_loss=()):
    """epoch_loss: the losses of the epoch so far (a resume mid-epoch logs the whole epoch's mean)."""
    d = run / "ckpt"
    name = f"step_{step:08d}"
    extra = {f"decoder.{k}": v for k, v in decoder.state_dict().items()} if decoder is not None else None
    save_student(student, d / f"{name}.safetensors", cfg, extra)
    state = {"step": step, "optimizer": opt.state_dict(), "scaler": scaler.state_dict() if scaler else None,
             "rng": rng_state(), "epoch_loss": [float(v) for v in epoch_loss]}
    save_state(d / f"{name}{STATE_SUFFIX}", state)
    write_json(d / "latest.json", {"step": step, "weights": f"{name}.safetensors", "state": f"{name}{STATE_SUFFIX}"})
    # Files of later steps are what a save killed mid-way left before this run resumed from an earlier one:
    # counted as newest, they would push out the checkpoint latest.json names. The temp files of such a
    # save go too (each a whole state); no other save is in flight, rank 0 alone writes here.
    later = lambda p: int(p.name[5:13]) > step  # noqa: E731  step_NNNNNNNN...
    for p in [p for p in d.glob("step_*") if later(p)] + list(d.glob(".*.tmp")):
        p.unlink(missing_ok=True)
    weights = sorted(p for p in d.glob("step_*.safetensors") if not p.name.endswith(STATE_SUFFIX))
    for old in weights[:-keep]:
        old.unlink()
        old.with_name(old.name.replace(".safetensors", STATE_SUFFIX)).unlink(missing_ok=True)


# settings recorded after runs were already being resumed: compared only when the checkpoint has them
LATER_SETTINGS = ("embedding_version", "warmup", "weight_decay", "smoothl1_weight", "amp", "cache_content", "align",
                  "detect_size", "smallest_face", "min_face_prob", "per_epoch", "mt_balanced")


def readable_checkpoint(run, log=None) -> tuple[dict, dict, dict] | None:
    """(config, tensors, training state) of the newest checkpoint of run that reads whole: the one latest.json
    names, else (a file damaged since, a latest.json that is not JSON) the one before it that --keep kept,
    said in the log. None when run has none; a SystemExit naming each problem when none reads."""
    d = run / "ckpt"
    weights = sorted((p.name for p in d.glob("step_*.safetensors") if not p.name.endswith(STATE_SUFFIX)), reverse=True)
    missing = not (d / "latest.json").exists()
    if missing and not weights:
        return None
    try:
        named = json.loads((d / "latest.json").read_text())["weights"]
        weights = [named] + [w for w in weights if w < named]  # later ones: a save killed before latest.json
    except FileNotFoundError:  # deleted since (its checkpoints still count), or the first save was cut short
        problems = ["latest.json is missing"]
    except (ValueError, KeyError, TypeError) as e:
        problems = [f"latest.json is damaged ({type(e).__name__}: {e})"]
    else:
        problems = []
    for name in weights:
        try:
            saved_cfg, tensors = read_checkpoint(d / name)
            state = load_state(d / name.replace(".safetensors", STATE_SUFFIX))
        except (OSError, NotAStudent, StateError) as e:
            problems.append(str(e))
            continue
        if problems and log:
            log.warning(f"warning: {'; '.join(problems)}: resuming from {name}, the newest checkpoint that reads")
        return saved_cfg, tensors, state
    if missing:  # killed before its first checkpoint was whole: nothing here to resume
        return None
    raise SystemExit(f"error: cannot resume {run}: no checkpoint reads ({'; '.join(problems) or 'none left'}). "
                     f"Start it afresh with --overwrite instead of --resume (or another --run-dir)")


def load_checkpoint(run, student, decoder, opt, scaler, cfg, log=None) -> tuple[int, list]:
    """Restore the latest checkpoint of run into the given objects; returns its step (0 if none) and the losses
    of its epoch so far."""
    if any((run / "ckpt").glob(f"*{LEGACY_STATE_SUFFIX}")):
        raise SystemExit(f"error: cannot resume {run}: its checkpoints were written by an older distill.py as "
                         f"*{LEGACY_STATE_SUFFIX} files, which only load through pickle (a run folder from "
                         f"elsewhere could run code), so they are not read. Start it afresh with the same "
                         f"command and --overwrite instead of --resume (or another --run-dir), or, if you wrote this "
                         f"folder yourself, convert it with `python -m common.checkpoint {run}`, then --resume")
    found = readable_checkpoint(run, log)
    if found is None:
        return 0, []
    saved_cfg, tensors, state = found
    # The cache is known by its content and h_G's version: a copy of it elsewhere (a job moved to local disk)
    # resumes; its path counts only for runs saved before the content was recorded.
    ignore = {"teacher_cache"} if "cache_content" in saved_cfg else set()
    differs = {k: (saved_cfg.get(k), v) for k, v in {**student.config, **cfg}.items() if saved_cfg.get(k) != v
               and k not in ignore and (k in saved_cfg or k not in LATER_SETTINGS)}
    if "per_epoch" not in saved_cfg and saved_cfg.get("world", 1) > 1:  # an epoch's steps were counted otherwise
        raise SystemExit(f"error: cannot resume {run}: a multi-process run saved by an older distill.py, whose "
                         f"epochs had another number of steps (a face could go to two processes): start it afresh "
                         f"with --overwrite instead of --resume")
    if cfg.get("mt_balanced") and "mt_balanced" not in saved_cfg and saved_cfg.get("loss") == "mt":
        raise SystemExit(f"error: cannot resume {run}: an older distill.py started it, whose checkpoints do not say "
                         f"whether its --loss mt weighed the teachers as G (fitted with fuse.py --balance) does, "
                         f"which this one does (most older ones did not): the rest of its training could learn "
                         f"another loss; start it afresh with --overwrite instead of --resume")
    if set(differs) == {"embedding_version"}:  # a fuse.py run since: the targets are another G's
        then, now = differs["embedding_version"]
        raise SystemExit(f"error: cannot resume {run}: its h_G '{cfg['embedding']}' was written anew since it "
                         f"started (by fuse.py: version {then} then, {now} now), so the rest of its training would "
                         f"learn other targets; start it afresh with --overwrite instead of --resume")
    if differs:
        raise SystemExit(f"error: cannot resume {run}: it was started with other settings "
                         + ", ".join(f"{k}={a} (now {b})" for k, (a, b) in differs.items())
                         + "; give those, or start it afresh with --overwrite instead of --resume")
    student.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("student.")})
    if decoder is not None:
        decoder.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("decoder.")})
    opt.load_state_dict(state["optimizer"])  # moves the moments to the parameters' device
    # ...but not to their memory format: moments saved contiguous beside channels-last weights would
    # take AdamW off its foreach path (one kernel per tensor) for the rest of the run
    for group in opt.param_groups:
        for p in group["params"]:
            for key, v in opt.state.get(p, {}).items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    opt.state[p][key] = torch.empty_like(p).copy_(v)
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return int(state["step"]), list(state.get("epoch_loss", []))


RUN_OUTPUTS = ("ckpt", "metrics.jsonl", "loss.png", "student.safetensors", "eval.json", "table5_student.md",
               "student.onnx", "student.torchscript.pt")


def refuse_to_clobber(out, resume, overwrite, delete=True) -> None:
    """A run started without --resume in a folder that holds a run's checkpoints or results stops, unless
    --overwrite says to delete them: a repeated command must not wipe hours of training."""
    if out is None or resume:
        return
    found = [n for n in RUN_OUTPUTS if (Path(out) / n).exists()]
    if found and not overwrite:
        raise SystemExit(f"error: {out} already holds a run ({', '.join(found)}): pass --resume to continue it, "
                         f"--overwrite to delete its checkpoints and results and start afresh, or another --run-dir")
    for path in [Path(out) / n for n in found] if delete else []:
        if path.is_dir() and not path.is_symlink():  # a link goes, not what it points to
            shutil.rmtree(path)
        else:
            path.unlink()


# ---------------------------------------------------------------------------------------- training
def split_rows(cache, name, seed):
    """Training and held-out rows among found faces; held out = fuse.py's held-out rows for G."""
    found = np.flatnonzero(cache.found)
    val_file = cache.embedding_dir(name) / "val_rows.npy"
    if val_file.exists():
        val = np.intersect1d(np.load(val_file), found)
    else:
        val = np.sort(np.random.default_rng(seed).permutation(found)[: max(2, len(found) // 10)])
    return np.setdiff1d(found, val), val


def learnt_embedding(args) -> tuple:
    """(cache, h_G name, h_G, its meta): the cache's h_G `--embedding` (default: the one fuse.py wrote last), its
    files checked, before the run folder is made (a cache without one left an empty run folder)."""
    cache = FeatureCache(args.teacher_cache).require_complete()
    names = cache.embedding_names()
    name = args.embedding or (names[0] if names else None)
    return cache, name, *cache.embedding(name or "ae")


def setup(args, rank, world, device, run, log, known) -> SimpleNamespace:
    """Everything the training loop needs: data, student (and decoder for mt), optimizer, restored state.
    known: learnt_embedding(args)."""
    cache, name, hG, meta = known
    train_rows, val_rows = split_rows(cache, name, args.seed)
    if len(train_rows) < args.batch * world:
        raise SystemExit(f"error: {len(train_rows)} training faces, fewer than one step of --batch {args.batch} "
                         f"x {world} processes: lower --batch")
    if args.size > cache.crop_size and rank == 0:
        log.warning(f"warning: --size {args.size} is larger than the crop store's {cache.crop_size}-pixel crops, "
                    f"which the student then sees enlarged, with no more detail; for more, extract the cache "
                    f"with fuse.py --crop-size {args.size} or more")
    sums = cache.target_sums(name) if (cache.embedding_dir(name) / "val_rows.npy").exists() else None
    if sums is not None and sums[2] == len(train_rows):  # fuse.py summed these rows as it wrote h_G
        hG_mean, hG_std = fusion.stats_of_sums(*sums)
    else:
        hG_mean, hG_std = fusion.column_stats(hG, train_rows)
    out_dim = int(meta["dim"])
    targets = cache.features if args.loss == "mt" else hG
    if rank == 0 and (why := open_files_warning(2 * cache.n_shards)):  # the crops and the targets
        log.warning(why)

    torch.manual_seed(args.seed)
    student = build_student(args.arch, args.width, out_dim)
    decoder = None
    if args.loss == "mt":  # G~'s architecture, trained from scratch with the student (paper, sec. 3.4)
        decoder = fusion.mlp(fusion.layer_widths(cache.dim, out_dim)[::-1])
    else:  # start from the mean h_G: the student then only has to learn each face's deviation from it
        with torch.no_grad():
            student.proj.bias.copy_(torch.from_numpy(hG_mean))
    net = student if decoder is None else torch.nn.Sequential(student, decoder)
    cfg = {"size": args.size, "embedding": name, "loss": args.loss, "embedding_op": meta.get("op"),
           "seed": args.seed, "batch": args.batch, "world": world, "lr": args.lr, "epochs": args.epochs,
           "steps": args.steps, "teacher_cache": str(Path(args.teacher_cache).resolve()),
           "crop_size": cache.crop_size, "cache_content": cache.manifest.get("content_hash"),
           "warmup": args.warmup, "weight_decay": args.weight_decay,
           "smoothl1_weight": args.smoothl1_weight if args.loss == "cosine+smoothl1" else None,
           "mt_balanced": g_weight(cache, name) is not None if args.loss == "mt" else None,
           # how the crops were found and aligned, so that `distill.py embed` finds faces the same way
           **{k: as_planned(cache.manifest).get(k) for k in ("align", "detect_size", "smallest_face", "min_face_prob")},
           # which version of h_G (fuse.py writes each into a folder of its own): a resume must not go on
           # against targets and units that a fuse.py run has replaced meanwhile
           "embedding_version": Path(meta["folder"]).name,
           "per_epoch": len(train_rows) // (world * args.batch)}  # EpochSampler's: whole global batches
    channels_last = args.channels_last == "on" or (args.channels_last == "auto" and device.type == "cuda")
    net.to(device)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    amp_dtype, scaler = precision.amp_policy(args.amp, device)
    cfg["amp"] = str(amp_dtype)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    start, start_loss = load_checkpoint(run, student, decoder, opt, scaler, cfg, log) if args.resume else (0, [])
    metrics = run / "metrics.jsonl"
    if start and rank == 0 and metrics.exists():
        # Epochs logged after the checkpoint resumed from are trained again: drop their lines.
        kept = [row for row in read_metrics(metrics) if row["step"] <= start]
        atomic_write(metrics, lambda f: f.write("".join(json.dumps(row) + "\n" for row in kept).encode()))
    if start == 0 and rank == 0 and args.resume and ((run / "ckpt").exists() or (run / "metrics.jsonl").exists()):
        # No latest.json: killed before its first checkpoint was whole, so nothing here can be resumed.
        log.info(f"no checkpoint to resume in {run}: starting afresh, removing the partial files of the first try")
        shutil.rmtree(run / "ckpt", ignore_errors=True)
        (run / "metrics.jsonl").unlink(missing_ok=True)
    elif start == 0 and rank == 0 and args.resume:  # a typo in --run-dir would otherwise cost a run unsaid
        log.info(f"--resume: no run in {run} yet: starting afresh")
    model = net
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=ids)
    loss_fn = make_loss(args.loss, cache, name, hG_mean, hG_std, device, args.smoothl1_weight)

    data = AlignedFaces(cache, train_rows, train=True, targets=targets)
    sampler = EpochSampler(data, args.seed, rank, world, batch=args.batch)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch, sampler=sampler, num_workers=args.workers,
                                         drop_last=True, pin_memory=device.type == "cuda", collate_fn=first,
                                         persistent_workers=args.workers > 0, generator=torch.Generator(),
                                         worker_init_fn=leave_stops_to_the_parent)
    per_epoch = sampler.num_samples // args.batch
    total = args.steps or args.epochs * per_epoch
    if args.stop_at and args.stop_at < start < total:  # before args.json records it (it said "stopped at step 10
        # as asked" of a run at step 20); at the step itself, the time slot's command run again: nothing to do
        raise SystemExit(f"error: --stop-at {args.stop_at}: the run in {run} is at step {start} already; give a "
                         f"later step, or none to finish it")
    log.info(f"student {args.arch} width {student.config['width']}: {n_params(student):,} parameters "
             f"({n_params(student.backbone):,} backbone + {n_params(student.proj):,} projection to h_G "
             f"'{name}' of width {out_dim})" + (f"; + decoder {n_params(decoder):,}" if decoder else ""))
    log.info(f"{len(train_rows)} training faces, {len(val_rows)} held out; {total} steps of {args.batch} x {world} "
             f"({per_epoch} per epoch), loss {args.loss}, {device}, amp {amp_dtype}, channels-last {channels_last}"
             + (f"; resumed at step {start}" if start else ""))
    return SimpleNamespace(cache=cache, name=name, student=student, decoder=decoder, net=net, model=model, opt=opt,
                           scaler=scaler, amp_dtype=amp_dtype, channels_last=channels_last, loss_fn=loss_fn,
                           loader=loader, sampler=sampler, per_epoch=per_epoch, total=total, start=start, cfg=cfg,
                           start_loss=start_loss,
                           train_rows=train_rows, val_rows=val_rows, hG_mean=hG_mean)


def train(s: SimpleNamespace, args, rank, world, run, log) -> int:
    """The training loop, from s.start to --steps/--epochs (or --stop-at); returns the last step done.

    The losses stay on the device and are read back every --log-every steps, before each checkpoint and at
    the end of each epoch: a non-finite one stops the run there, naming its step, before any checkpoint of
    its weights is written."""
    stop = min(args.stop_at or s.total, s.total)
    step, epoch_loss, seen, t0 = s.start, list(s.start_loss), 0, time.time()
    imgs = args.batch * world
    device = next(s.net.parameters()).device
    bar = Progress("distill", "img", s.total * imgs, initial=step * imgs) if rank == 0 else None
    pending = []  # (step, 0-d loss on the device) since the last sync

    def sync():
        if not pending:
            return
        values = torch.stack([loss for _, loss in pending])
        if world > 1:
            dist.all_reduce(values)  # every rank must see a NaN, to stop together
            values /= world
        values = values.tolist()
        for (at, _), value in zip(pending, values):
            if not math.isfinite(value):
                raise NonFiniteLoss(f"the loss became {value} at step {at}")
        if step == stop and s.start == 0 and s.scaler is not None and s.scaler.taken == 0:  # before the last checkpoint
            raise NonFiniteLoss(f"float16's loss scaler skipped all {step} steps (inf or NaN gradients): the student "
                                f"never trained")
        epoch_loss.extend(values)
        if bar:
            bar.update(len(pending) * imgs, step=f"{pending[-1][0]}/{s.total}", loss=f"{values[-1]:.4f}", epoch=epoch)
        pending.clear()

    while step < stop:
        epoch, skip = divmod(step, s.per_epoch)
        s.sampler.set_position(epoch, skip * args.batch)  # the order depends on (seed, epoch) only
        s.net.train()
        for batch in s.loader:
            for g in s.opt.param_groups:
                g["lr"] = lr_at(step, s.total, args.lr, args.warmup)
            fn = (lambda o, t: s.loss_fn(o, t) * float("nan")) if step + 1 == args.inject_nan_at else s.loss_fn
            pixels = to_device_pixels(batch, args.size, device, train=True)
            loss = train_step(s.model, pixels, batch["target"], fn, s.opt, s.amp_dtype, s.scaler, s.channels_last)
            step += 1
            seen += imgs
            pending.append((step, loss))
            ends_epoch = step % s.per_epoch == 0 or step == s.total
            checkpoint = rank == 0 and (step % args.ckpt_every == 0 or step == stop)
            if step % args.log_every == 0 or step % args.ckpt_every == 0 or step == stop or ends_epoch:
                sync()  # on every rank at the same steps (the all-reduce inside)
            if ends_epoch:
                if rank == 0:  # the epoch's line before its checkpoint: a kill between the two loses no line
                    log_epoch(run, log, epoch, step, s.total, epoch_loss, seen / max(time.time() - t0, 1e-9))
                epoch_loss, seen, t0 = [], 0, time.time()
            if checkpoint:
                save_checkpoint(run, step, s.student, s.decoder, s.opt, s.scaler, s.cfg, args.keep, epoch_loss)
            if step == stop:
                break
    if bar:
        bar.close()
    return step


def read_metrics(path: Path) -> list[dict]:
    """The epochs of metrics.jsonl; a line an append cut short (a kill, a full disk) is passed over, and a
    resume rewrites the file without it."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in rows if isinstance(r, dict) and "step" in r and "loss" in r]


def log_epoch(run, log, epoch, step, total, losses, rate) -> None:
    """One line of metrics.jsonl per epoch (the losses of the part before a resume included)."""
    row = {"epoch": epoch, "step": step, "loss": float(np.mean(losses)), "img_s": rate}
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    log.info(f"epoch {epoch}: step {step}/{total}, mean loss {row['loss']:.4f}, {rate:.1f} img/s")


def plot_loss(run: Path, loss: str) -> None:
    """loss.png: every epoch of metrics.jsonl, those of the runs resumed from included."""
    epochs = read_metrics(run / "metrics.jsonl")
    if epochs:
        plots.lines(run / "loss.png", None, {"mean over the epoch": ([r["step"] for r in epochs],
                                                                   [r["loss"] for r in epochs])},
                    "step", f"training loss ({loss})", "distill.py: the student's training loss")


# -------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def embed_rows(student, cache, rows, size, device, batch=128, workers=0):
    """Student embeddings of cache rows (evaluation view of their stored crops), float32, in row order."""
    data = AlignedFaces(cache, rows, train=False, targets=NoTargets())
    loader = torch.utils.data.DataLoader(data, batch_size=batch, num_workers=workers, collate_fn=first,
                                         worker_init_fn=leave_stops_to_the_parent)
    student.eval()
    out = [student(to_device_pixels(b, size, device, train=False)).float().cpu()
           for b in counted(loader, "embed", "batch", len(loader))]
    return torch.cat(out).numpy() if out else np.zeros((0, student.config["out_dim"]), np.float32)


def check_rows(cache, name, held, seed) -> tuple[np.ndarray, np.ndarray]:
    """(rows that choose the check decoder's epoch, rows it is reported on) among the held-out faces: G's own
    validation and test faces (split.npz), as fuse.py chose G's step and reported Table 5; a seeded half
    each for an h_G written before split.npz was kept."""
    split = cache.embedding_dir(name) / "split.npz"
    if split.exists():
        with np.load(split) as sp:
            choose, report = np.intersect1d(sp["val"], held), np.intersect1d(sp["test"], held)
        if len(choose) and len(report):
            return choose, report
    order = np.random.default_rng(seed).permutation(held)
    return np.sort(order[: len(held) // 2]), np.sort(order[len(held) // 2:])


def fit_check_decoder(h_tr, x_tr, h_ch, x_ch, h_re, epochs, seed, device):
    """Table 5's check: a decoder like G's fitted from embeddings to standardised h_i; returns its predictions
    for h_re (the faces reported on) at the epoch with the lowest error on h_ch / x_ch (other faces), as
    fuse.py keeps G's step on validation faces and reports test faces. Inputs are standardised first (a
    cosine-trained embedding has no fixed scale)."""
    torch.manual_seed(seed)
    mu, sd = h_tr.mean(0), h_tr.std(0) + 1e-6
    t = lambda a: torch.tensor(a, dtype=torch.float32, device=device)
    h_tr, h_ch, h_re, x_tr, x_ch = t((h_tr - mu) / sd), t((h_ch - mu) / sd), t((h_re - mu) / sd), t(x_tr), t(x_ch)
    dec = fusion.mlp(fusion.layer_widths(x_tr.shape[1], h_tr.shape[1])[::-1]).to(device)
    opt = torch.optim.Adam(dec.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)
    best, best_pred = float("inf"), None
    for _ in range(epochs):
        dec.train()
        order = rng.permutation(len(h_tr))
        for i in range(0, len(order), 256):
            idx = torch.from_numpy(order[i:i + 256]).to(device)
            loss = F.mse_loss(dec(h_tr[idx]), x_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            dec.eval()
            err = float(F.mse_loss(dec(h_ch), x_ch))
            if err < best:
                best, best_pred = err, dec(h_re).cpu().numpy()
    return best_pred


def evaluate(args, cache, name, student, decoder, train_rows, val_rows, device, run, log, hG_mean):
    mean, std = cache.input_stats(name)
    slices = cache.slices()
    hG, meta = cache.embedding(name)
    h_val_true = hG.take(val_rows).astype(np.float32)
    rng = np.random.default_rng(args.seed)
    fit_rows = np.sort(rng.permutation(train_rows)[: args.recon_max_train])
    h_fit, h_val = (embed_rows(student, cache, r, args.size, device, workers=args.workers)
                    for r in (fit_rows, val_rows))
    cos = lambda a, b: F.cosine_similarity(torch.from_numpy(a), torch.from_numpy(b), dim=1).numpy()
    standardise = lambda x: (x.astype(np.float32) - mean.astype(np.float32)) / std.astype(np.float32)
    x_fit = standardise(cache.features.take(fit_rows))
    choose, report = check_rows(cache, name, val_rows, args.seed)
    at = lambda rows: np.searchsorted(val_rows, rows)  # noqa: E731  positions among the held-out rows
    x_ch = standardise(cache.features.take(choose))
    x_re = cache.features.take(report).astype(np.float64)

    G, _ = fusion.load(cache.embedding_dir(name) / "G.safetensors")
    with torch.no_grad():
        g_rec = G.decode(torch.from_numpy(h_val_true[at(report)])).numpy() * std + mean
    pred = fit_check_decoder(h_fit, x_fit, h_val[at(choose)], x_ch, h_val[at(report)], args.recon_epochs, args.seed,
                             device) * std + mean
    column = "E_MT" if args.loss == "mt" else "E_unique"
    table = {f"G ({meta.get('op', name)})": fusion.nrmse_per_block(g_rec, x_re, mean, slices),
             f"{column} (student)": fusion.nrmse_per_block(pred, x_re, mean, slices)}
    result = {"embedding": name, "loss": args.loss, "n_fit": len(fit_rows), "n_choose": len(choose),
              "n_report": len(report), "n_val": len(val_rows), "params": n_params(student), "nrmse": table,
              "protocol": "check decoder shaped like the paper-layout G's decoder, fitted on the student's "
                          "embeddings of n_fit training faces; its epoch chosen on n_choose held-out faces (G's "
                          "validation faces), "
                          "both columns reported on n_report others (G's test faces), as fuse.py does for G; "
                          "the cosines over all n_val held-out faces"}
    if args.loss == "mt":
        with torch.no_grad():
            direct = decoder.to(device).eval()(torch.from_numpy(h_val[at(report)]).to(device)).cpu().numpy()
        table["E_MT own decoder"] = fusion.nrmse_per_block(direct * std + mean, x_re, mean, slices)
    else:
        hG_mean = hG_mean.astype(np.float32)  # the training mean setup() took: a second pass costs ~19 s at 4.12 M
        result.update(cos_val=float(cos(h_val, h_val_true).mean()),
                      cos_val_mean_baseline=float(cos(np.broadcast_to(hG_mean, h_val_true.shape).copy(),
                                                      h_val_true).mean()))
    md = fusion.table5(table)
    head = (f"Reconstruction normalised RMSE of each h_i on {len(report)} held-out faces (Table 5; the check "
            f"decoder's epoch chosen on {len(choose)} others)")
    if "cos_val" in result:
        head += (f"\n\nHeld-out cosine(student, h_G) = {result['cos_val']:.4f} over {len(h_val)} faces "
                 f"(the training mean of h_G alone scores {result['cos_val_mean_baseline']:.4f})")
    write_text(run / "table5_student.md", f"{head}\n\n{md}\n")
    write_json(run / "eval.json", result)
    log.info(f"{head}\n{md}")
    return result


# ------------------------------------------------------------------------------------------ export
def export_student(student, out_dir, size, formats=EXPORTS) -> dict:
    """Write the student as ONNX and/or TorchScript; input 'pixels' N x 3 x size x size float 0..255."""
    student = student.cpu().eval()
    out_dir = Path(out_dir)
    x = torch.randint(0, 256, (2, 3, size, size)).float()
    paths = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation chatter
        if "onnx" in formats:
            paths["onnx"] = out_dir / "student.onnx"
            # The TorchScript-based exporter needs no onnxscript and handles this plain CNN exactly.
            tmp = out_dir / ".student.onnx.part"
            torch.onnx.export(student, (x,), str(tmp), dynamo=False, input_names=["pixels"],
                              output_names=["embedding"], dynamic_axes={"pixels": {0: "n"}, "embedding": {0: "n"}},
                              opset_version=17)
            tmp.replace(paths["onnx"])
        if "torchscript" in formats:
            paths["torchscript"] = out_dir / "student.torchscript.pt"
            with torch.no_grad():
                traced = torch.jit.trace(student, x)
            atomic_write(paths["torchscript"], lambda f: torch.jit.save(traced, f))
    return paths


# ------------------------------------------------------------------------------------------- embed
@torch.no_grad()
def embed_images(checkpoint, paths, batch=64, device="cpu", min_prob=None, workers=0, say=None):
    """(embeddings, reasons) for image files: the extraction engine's detection and alignment, with the settings
    of the cache the student learnt from (min_prob, when given, replaces its threshold), the crop the student
    was trained on (the crop store's size, then its input size), then the student. A row whose image has no
    usable face is NaN and its reason is non-empty; the rows always line up with paths. say: told the settings."""
    from common.align import CROP_SIZE, DETECT_SIZE, MIN_FACE_PROB, SMALLEST_FACE
    from common.extract import Options, crops_of_files

    student, cfg = load_student(checkpoint, device)
    device = torch.device(device)
    emb = np.full((len(paths), cfg["out_dim"]), np.nan, np.float32)
    reasons = [""] * len(paths)
    align = cfg.get("align") or "mtcnn"
    if min_prob is not None and align == "none":  # it would go unread
        raise SystemExit(f"error: --min-face-prob {min_prob:g}: {checkpoint} learnt from faces taken whole (--align "
                         f"none), so no face is detected here either: drop it")
    threshold = (cfg.get("min_face_prob") or MIN_FACE_PROB) if min_prob is None else min_prob  # 0 is a threshold: every face
    opts = Options(align=align, min_face_prob=threshold,
                   batch=batch, workers=workers, detect_size=cfg.get("detect_size") or DETECT_SIZE,
                   smallest_face=cfg.get("smallest_face") or SMALLEST_FACE)
    if say:
        found_by = ("each whole image is the crop (--align none)" if opts.align == "none" else
                    f"MTCNN at --detect-size {opts.detect_size}, --smallest-face {opts.smallest_face}, "
                    f"--min-face-prob {opts.min_face_prob:g}")
        say(f"faces: {found_by}, as the student's training faces were found; {cfg.get('crop_size') or CROP_SIZE}-"
            f"pixel crops resized to the student's {cfg['size']}")
    bar = Progress("embed", total=len(paths))
    for idx, crops, found, why in crops_of_files(paths, device, opts, cfg.get("crop_size") or CROP_SIZE):
        for i, r in zip(idx, why):
            reasons[i] = r
        if found.any():
            emb[idx[found]] = student(resize(crops[torch.from_numpy(found).to(device)], cfg["size"])).float().cpu().numpy()
        bar.update(len(idx))
    bar.close()
    return emb, reasons


def embed_main(argv):
    p = argparse.ArgumentParser(prog="distill.py embed", formatter_class=HelpFormatter,
                                description="Embed a folder of face images with a trained student: detect and "
                                            "align each face, then write one row per image.")
    p.add_argument("--student", "--checkpoint", dest="checkpoint", metavar="PATH", type=Path, required=True,
                   help="student .safetensors or a distill.py run folder")
    p.add_argument("--data", "--images", dest="images", metavar="DIR", type=Path, required=True, help="folder of images (any tree)")
    p.add_argument("--out", type=Path, required=True,
                   help="output .npy (N x width, NaN rows for images without a face); beside it, named like it "
                        "without .npy, NAME.paths.txt (the image of each row) and NAME.missed.tsv (images without "
                        "a usable face, and why)")
    p.add_argument("--batch", type=int, default=64, help="faces per student batch")
    p.add_argument("--device", default="auto", help="device of the student (auto, cpu, cuda ...)")
    p.add_argument("--min-face-prob", type=PROBABILITY, default=None,
                   help="detector confidence below which no face counts (default: that of the cache the student "
                        "learnt from, whose detection settings embed uses; 0.9 for students saved before they "
                        "were kept)")
    a = p.parse_args(argv)
    one_process_only("distill.py embed", "--out (e.g. one folder of images each)")
    log = get_logger(None, "embed")  # on stdout, with the shared modules' lines (the progress of long folders)
    if a.batch < 1:
        raise SystemExit(f"error: --batch {a.batch}: at least 1 face per batch")
    from common.images import encode_paths, list_images

    # the output's place is checked before the work, not after it
    if a.out.is_dir():
        raise SystemExit(f"error: --out {a.out} is a folder; name a file, such as {a.out / 'embeddings.npy'}")
    if a.out.suffix != ".npy":  # np.save's bytes under another name: read back as text they are garbage
        raise SystemExit(f"error: --out {a.out}: name a .npy file (such as {a.out.with_suffix('.npy')})")
    try:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=a.out.parent).close()  # a folder there but not writable fails now too
    except OSError as e:
        raise SystemExit(f"error: cannot write into the folder of --out {a.out} ({e.strerror})")
    rel = list_images(a.images)
    if not rel:
        raise SystemExit(f"error: no images under {a.images}")
    LAST_RUN[:] = ["embed", a.out]  # what a Ctrl-C says: no run folder to name
    sha = pin(a.checkpoint)  # which student made the rows, said at the end: its folder may be rewritten meanwhile
    emb, reasons = embed_images(a.checkpoint, [str(a.images / r) for r in rel], a.batch,
                                pick_device(a.device), a.min_face_prob, say=log.info)
    stem = a.out.with_suffix("")
    # the array last, an earlier one gone first: a kill between the three writes must not leave rows beside the
    # paths of another run (each file is written whole, the set is whole once the array is there)
    a.out.unlink(missing_ok=True)
    atomic_write(Path(f"{stem}.paths.txt"), lambda f: f.write(encode_paths(rel)))
    write_reasons(Path(f"{stem}.missed.tsv"), [(r, why) for r, why in zip(rel, reasons) if why])
    atomic_write(a.out, lambda f: np.save(f, emb))
    n_miss = sum(1 for r in reasons if r)
    log.info(f"{len(rel) - n_miss} faces embedded, {n_miss} images without a usable face (NaN rows, listed in "
             f"{stem}.missed.tsv) -> {a.out} ({emb.shape[0]} x {emb.shape[1]}), by the student of sha256 {sha}")


# -------------------------------------------------------------------------------------------- main
@holding_runs
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["embed"]:
        return embed_main(argv[1:])
    args = parse_args(argv)
    if not (args.teacher_cache / "manifest.json").exists():
        raise SystemExit(f"error: no feature cache at {args.teacher_cache}: run `python fuse.py` first "
                         f"(it writes feats/demo), or pass --cache")
    # every rank, for the whole run: fuse.py --overwrite (or --retry-unreadable) of this cache is refused meanwhile
    hold_for_reading(args.teacher_cache)
    known = learnt_embedding(args)
    args.embedding = known[1]  # recorded resolved: a --resume reads this h_G even if fuse.py wrote another since
    rank, world = dist_info()
    device = pick_device(args.device)
    if world > 1:
        init_dist(device)
    torch.backends.cudnn.benchmark = not args.deterministic
    torch.backends.cudnn.deterministic = args.deterministic
    if args.out is None and args.teacher_cache == Path("feats/demo"):
        args.out = Path("runs/distill-demo")
    if rank == 0 and (why := run_dir_problem(args.out, "distill")):  # before its lock is taken through a link
        raise SystemExit(why)
    if rank == 0 and args.out is not None and Path(args.out).is_dir():
        hold(Path(args.out))  # before --overwrite deletes anything: a run still going there keeps its files
    refuse_to_clobber(args.out, args.resume, args.overwrite, delete=rank == 0)
    run = make_run_dir(args.out, "distill", args, record=not args.resume) if rank == 0 else None
    if world > 1:  # the other ranks need the run folder rank 0 chose (a timestamp when --run-dir is not given)
        box = [run]
        dist.broadcast_object_list(box)
        run = box[0]
    log = get_logger(run, "distill") if rank == 0 else logging.getLogger(f"distill.rank{rank}")
    try:
        s = setup(args, rank, world, device, run, log, known)
        if args.resume and rank == 0:  # its settings checked against the checkpoint's
            write_args(run, "distill", args)
        finished = train(s, args, rank, world, run, log) == s.total
    except NonFiniteLoss as e:
        kept = (f"The last good checkpoint is kept in {run / 'ckpt'}, but --resume would repeat the same batches "
                f"with the same settings (and refuses new ones)" if any((run / "ckpt").glob("step_*"))
                else "No checkpoint was written before it")
        msg = (f"error: {e}; stopped. {kept}: start afresh with --overwrite (instead of --resume) and a lower --lr, "
               f"or --amp off")
        log.error(msg)
        if world > 1:
            dist.destroy_process_group()
        raise SystemExit(msg)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank != 0:
        return
    if not finished:
        plot_loss(run, args.loss)
        log.info(f"stopped at step {args.stop_at} as asked; continue with --resume --run-dir {as_arg(run)}")
        return
    decoder = {f"decoder.{k}": v for k, v in s.decoder.state_dict().items()} if s.decoder is not None else None
    save_student(s.student, run / "student.safetensors", s.cfg, decoder)
    log.info(f"student written to {run / 'student.safetensors'}")
    plot_loss(run, args.loss)  # after the student: nothing in a plot may cost the trained weights
    formats = args.export
    if formats:
        for fmt, path in export_student(s.student, run, args.size, formats).items():
            log.info(f"exported {fmt}: {path}")
        s.student.to(device)
    now = s.cache.embedding_dir(s.name).name
    if not args.no_eval and now != s.cfg["embedding_version"]:  # its G, units and split are another h_G's
        log.warning(f"warning: fuse.py wrote h_G '{s.name}' anew while the student trained ({now}, the student "
                    f"learnt {s.cfg['embedding_version']}): not evaluated against it (no eval.json); distill again "
                    f"to have a student of the new h_G")
    elif not args.no_eval:
        evaluate(args, s.cache, s.name, s.student, s.decoder, s.train_rows, s.val_rows, device, run, log, s.hG_mean)
    log.info(f"run folder: {run}")


if __name__ == "__main__":
    run_main(main)

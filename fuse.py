"""Step 1 of the paper (sections 3.2, 4.1, 4.3-4.4): fuse several pretrained face models into one embedding.

  1. detect and align every face once (MTCNN, 5 landmarks, similarity transform to a canonical crop);
  2. run every teacher on every face and cache its embedding h_i (sharded, memory-mapped, resumable);
  3. train the fusion operator G on the cached h_i (autoencoder; PCA, VAE, DAE, concat to compare),
     choosing its training step on validation faces;
  4. report each teacher's reconstruction error on test faces (Table 5) and write h_G for every face.

  python fuse.py                                  # embedded real faces from installed packages
  python fuse.py --data /faces --cache feats/faces     # your own unlabelled faces (any folder tree)
  python fuse.py --data synth:11000 --align none --teachers age,gender,onet --ops ae,pca --test-frac 0.08 \\
      --n-sweep 1000,3000,10000               # G against N
  torchrun --nproc_per_node 4 fuse.py --data /faces --cache feats/faces   # several GPUs: shards split by rank

The three scripts name one thing one way: --data (images), --cache (the feature cache this script
writes and the others read), --run-dir (logs, tables, checkpoints), --student (distill.py's result).
"""
from __future__ import annotations

import argparse
import datetime
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tabulate import tabulate

from common import fusion, plots, synth
from common.align import CROP_SIZE, DETECT_SIZE, MIN_FACE_PROB, SMALLEST_FACE
from common.cache import (CacheDamaged, CacheMismatch, FeatureCache, as_planned, hold_for_reading, list_changes,
                          lock_file, make_plan, read_manifest, readers_lock_file, write_missed)
from common.extract import DETECTOR_FLAGS, KnownFaces, Options, detection_problem
from common.extract import extract as engine_extract
from common.files import write_json, write_text
from common.fusion import Standardised
from common.images import IMAGE_EXTENSIONS, list_images
from common.progress import Progress, counted
from common.runs import (COUNT, NONNEGATIVE, POSITIVE, POSITIVE_INT, PROBABILITY, HelpFormatter, bounded, comparable,
                         dist_info, get_logger, given_flags, hold, holding_runs, init_dist, kept_warnings,
                         make_run_dir, pick_device, recorded_args, run_dir_problem, run_main, stamped_folder)
from common.teachers import DEFAULT_TEACHERS, REGISTRY, build_teachers, cached_teacher, load_config


# The extraction's settings: a flag left out takes the one the existing --cache was made with (a rerun, or G
# fitted anew, needs none of them again), else this default.
EXTRACTION = {"shard_size": 4096, "dtype": "float16", "align": "mtcnn", "min_face_prob": MIN_FACE_PROB,
              "detect_size": DETECT_SIZE, "smallest_face": SMALLEST_FACE, "crop_size": CROP_SIZE}
SHARE = bounded(float, above=0, below=1)  # a held-out part of G's faces (0 gave the 2-face floor, unsaid)


def made_with(flag: str) -> str:
    detector = " made with the same --align" if flag in DETECTOR_FLAGS else ""
    return f" (default: that of an existing --cache{detector}, unless --overwrite; else {EXTRACTION[flag]})"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="fuse.py", description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("data and cache")
    g.add_argument("--data", type=Path, help="folder of unlabelled face images (any tree), or synth:N for N synthetic "
                   "faces drawn by an installed DCGAN into data/synth/ (see README). "
                   "Default: the images an existing --cache was made from, else the embedded real faces, gathered "
                   "from installed packages into data/demo_faces. A complete --cache whose images are gone is "
                   "taken as it is (G is fitted anew on its features)")
    g.add_argument("--cache", "--out", dest="out", metavar="DIR", type=Path,
                   help="feature cache folder (default: feats/demo; feats/NAME with --data DIR/NAME, feats/NAME-faces "
                        "for a folder named demo or tasks, feats/nN-SIZEpx-sSEED for synth:N); --out is the old "
                        "spelling")
    g.add_argument("--run-dir", type=Path, help="run folder for logs, tables and plots (default: runs/fuse-TIME)")
    g.add_argument("--overwrite", action="store_true", help="delete an existing cache at --cache and rebuild it")
    g.add_argument("--retry-unreadable", action="store_true",
                   help="extract again each shard holding an image the system would not give last time "
                        "(permission denied, I/O error, gone for a moment: 'cannot read' in missed_faces.tsv) that "
                        "opens now, say after a network mount came back; it reads every shard's reasons first. A "
                        "file that was missing then (a dangling link, an unmounted folder) and is there now is "
                        "taken too; any other file whose size or time changed since is another list of images, "
                        "refused as always")
    g.add_argument("--verify-crops", action="store_true",
                   help="read the whole crop store and extract again each shard whose crops no longer match the "
                        "sha256 recorded when they were written (a bit flip, an edit that kept the size, which the "
                        "start-up checks of sizes and headers cannot see); needs the images; 203 GB of reads at "
                        "4.12 M faces")
    g.add_argument("--shard-size", type=POSITIVE_INT,
                   help="faces per cache shard (resume granularity)" + made_with("shard_size"))
    g.add_argument("--dtype", choices=["float16", "float32"], help="storage type of h_i" + made_with("dtype"))
    g = p.add_argument_group("teachers and faces")
    g.add_argument("--teachers",
                   help="comma list of built-in teachers (default: those of an existing --cache, so that G is "
                        f"fitted anew on it as it was made, unless --overwrite or --teachers-config; else "
                        f"{','.join(DEFAULT_TEACHERS)}; see "
                        "--list-teachers; NAME@reference / NAME@torch "
                        "force a ported teacher's original runtime / its PyTorch module) and/or custom specs: "
                        "onnx:/path/model.onnx:LAYER:SIZE, litert:/path/model.tflite:LAYER:SIZE, "
                        "torchscript:/path/model.pt:SIZE, torchvision:resnet18:/path/weights.pth:LAYER:SIZE")
    g.add_argument("--teachers-config", type=Path,
                   help="JSON file of extra custom teachers (added to --teachers): a list whose entries are names, "
                        "spec strings, or objects {\"spec\": ..., and any of name, role, box, mean, std, color, "
                        "layout, reduce, input_size, dim}; relative paths are from the file's folder")
    g.add_argument("--list-teachers", action="store_true", help="print the teacher registry and exit")
    g.add_argument("--align", choices=["mtcnn", "none"],
                   help="mtcnn: detect and align each face; none: images already are face crops" + made_with("align"))
    g.add_argument("--min-face-prob", type=PROBABILITY,
                   help="detector confidence below which no face counts" + made_with("min_face_prob"))
    g.add_argument("--batch", type=POSITIVE_INT, default=32, help="images per batch (detection, alignment, teachers)")
    g.add_argument("--workers", type=COUNT, default=None,
                   help="loader processes reading and decoding images (detection runs batched in the main process). "
                        "Default: 0 on the CPU (the teachers use every core); on a GPU the cores this process may "
                        "use, shared out between torchrun's processes on the machine, less 2 each (the dispatching "
                        "thread, the shard writer), at most 12 (the H100 measurement ran 12 of 16 cores). Workers "
                        "pass decoded images through /dev/shm: in a container with a small one, enlarge it or "
                        "lower this")
    g.add_argument("--streams", type=COUNT, default=0,
                   help="batches in flight at once, each on a thread and (on a GPU) a CUDA stream of its own, so "
                        "that one batch's kernels run while another's detection dispatches its small ops or waits "
                        "on the device. 0 (default): 2 on the CPU (1.12x one on 2 cores), 1 on a GPU, where more "
                        "is not yet measured (BENCHMARKS.md)")
    g.add_argument("--detect-size", type=int,
                   help="longer side of the downscaled copy MTCNN searches (landmarks are mapped back to full "
                        "resolution); smaller is faster but misses small faces" + made_with("detect_size"))
    g.add_argument("--smallest-face", type=POSITIVE_INT,
                   help="faces smaller than this many pixels of that copy are not searched for: MTCNN's pyramid "
                        "levels that look only for them, its largest and costliest, are skipped and the others kept "
                        "as they are; only the dropped levels' proposals leave the NMS, which can move the "
                        "landmarks of faces up to about twice this size. 20 skips none. 40 ran detection "
                        "about 2x faster on the CPU with the same faces and landmarks on the demo media and on "
                        "images of mixed sizes (BENCHMARKS.md)" + made_with("smallest_face"))
    g.add_argument("--faces-from", type=Path, metavar="CACHE",
                   help="a finished cache of the same images and detector settings (say, the one made before a "
                        "teacher was added): its faces (detections, alignment matrices) are taken and nothing is "
                        "detected, which is most of extraction's time; the crops and so the features are those "
                        "that detecting again gives. Same images: same names, sizes and modification times (else "
                        "refused, saying what differs); an image whose bytes changed at the same size and time is "
                        "detected anew")
    g.add_argument("--crop-size", type=COUNT,
                   help="side of the aligned crops kept in the cache's crop store, which distill.py and transfer.py "
                        f"read instead of the images ({CROP_SIZE}: 48 kB a face, 203 GB for 4.12 M faces; 0: none)"
                        + made_with("crop_size"))
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    g = p.add_argument_group("fusion G")
    g.add_argument("--ops", default="ae,pca,vae,dae",
                   help=f"fusion operators to train and compare in the Table 5 report ({', '.join(fusion.OPERATORS)})")
    g.add_argument("--write", help="operator whose h_G is written into the cache for distill.py (default: first of "
                                   "--ops; one not in --ops is trained and reported too)")
    g.add_argument("--dim", default="",
                   help="width of h_G (default: mean teacher width, the paper's rule); a comma list a,b,c also "
                        "sweeps the widths with the first operator and plots error vs width (Figure 2's reconstruction "
                        "part; its transfer part: distil and transfer one h_G per width); "
                        "the first width of the list is the one written")
    g.add_argument("--ae-layout", default="residual", choices=fusion.LAYOUTS,
                   help="residual: linear path started from the PCA fit plus a regularised non-linear residual whose "
                        "hidden width follows the corpus size (never worse than PCA on the validation faces); "
                        "paper: the paper's geometric layers (5488-3136-1792-1024), randomly initialised")
    g.add_argument("--balance", default="none", choices=["none", "equal", "both"],
                   help="equal: every teacher's block weighs the same in G's loss (else wide teachers dominate); "
                        "both: train and report each operator both ways (h_G written from the unweighted one)")
    g.add_argument("--steps", type=POSITIVE_INT, default=2000,
                   help="most optimizer steps of an autoencoder (cosine schedule)")
    g.add_argument("--epochs", type=COUNT, default=0, help="if > 0, steps = this many passes over the training faces")
    g.add_argument("--eval-every", type=POSITIVE_INT, default=50,
                   help="steps between validation checks (early stopping)")
    g.add_argument("--patience", type=COUNT, default=10, help="validation checks without improvement before stopping")
    g.add_argument("--fusion-batch", type=POSITIVE_INT, default=256, help="batch size for training G")
    g.add_argument("--lr", type=POSITIVE, default=1e-3, help="AdamW peak learning rate for G")
    g.add_argument("--weight-decay", type=NONNEGATIVE, default=0.05, help="weight decay of the residual networks")
    g.add_argument("--val-frac", type=SHARE, default=0.1,
                   help="fraction of faces that choose G's step (validation; 2 faces at least)")
    g.add_argument("--test-frac", type=SHARE, default=0.1,
                   help="fraction of faces that Table 5 and Figure 2 report on")
    g.add_argument("--val-max", type=int, default=20000, help="at most this many validation faces")
    g.add_argument("--test-max", type=int, default=20000, help="at most this many test faces")
    g.add_argument("--split-group", default="image",
                   help="what keeps faces together in G's train/validation/test split, so that near-duplicates are "
                        "not on both sides: image (each alone), folder (the images of one subfolder: a person or a "
                        "video per folder, as VGGFace2 or CASIA-WebFace lay them out), or re:PATTERN (the part of "
                        "the path the regular expression matches, its first group if any: re:^(.+)_[0-9]+[.]jpg$ keeps "
                        "the frames name_0001.jpg, name_0002.jpg ... of one video together)")
    g.add_argument("--seed", type=COUNT, default=0, help="seed of the split, of training and of synth:N faces")
    g.add_argument("--n-sweep", default="",
                   help="comma list of corpus sizes (e.g. 1000,3000,10000): train --ops on the first N non-test "
                        "faces and plot test error against N (n_sweep.md/.png)")
    g.add_argument("--synth-size", type=POSITIVE_INT, default=160,
                   help="pixel size of synth:N faces (the DCGAN draws 64)")
    g.add_argument("--refit", action="store_true",
                   help="train every operator again, replacing the fits kept in the cache's fits/ folder (by "
                        "default a rerun loads the fits it finished and resumes the one a kill cut off)")
    g.add_argument("--extract-only", action="store_true", help="stop after the feature cache is complete")
    args = p.parse_args(argv)
    # a flag given that nothing reads would be recorded in args.json as if it had been used
    given = given_flags(p, argv)
    for flags, why in unread_rules(args):
        if named := [f"--{f.replace('_', '-')}" for f in flags if f in given]:
            raise SystemExit(f"error: {', '.join(named)}: {why}: drop {'them' if len(named) > 1 else 'it'}")
    if args.overwrite and (checks := [f for f, on in (("--verify-crops", args.verify_crops),
                                                       ("--retry-unreadable", args.retry_unreadable)) if on]):
        raise SystemExit(f"error: {' and '.join(checks)}: {'they look' if len(checks) > 1 else 'it looks'} again at "
                         f"the shards of --cache, which --overwrite deletes first: give one or the other")
    return args


def unread_rules(args) -> list[tuple[tuple[str, ...], str]]:
    """(flags, why) of the flags that nothing of this run reads. A typo in --ops/--write says nothing here:
    fusion_choices names it."""
    ops = {o.strip() for o in f"{args.ops},{args.write or ''}".split(",") if o.strip()}
    rules = [(FIT_FLAGS, args.extract_only, "for fitting G, which --extract-only skips"),
             (RECIPE_FLAGS, ops <= set(fusion.OPERATORS) and not ops & set(fusion.AUTOENCODERS),
              f"for training an autoencoder, and --ops/--write name none ({', '.join(sorted(ops))})"),
             (("dim", "balance"), ops == {"concat"}, "not read by concat, which keeps every dimension as it is"),
             (("weight_decay",), args.ae_layout == "paper", "for the residual layout (--ae-layout paper trains "
                                                            "with plain Adam)"),
             (("steps",), args.epochs > 0, "replaced by --epochs' passes over the training faces")]
    return [(flags, why) for flags, when, why in rules if when]


# fuse.py's flags that only fitting G reads, and of those, the ones only an autoencoder's training reads
FIT_FLAGS = ("ops", "write", "dim", "ae_layout", "balance", "steps", "epochs", "eval_every", "patience", "fusion_batch",
             "lr", "weight_decay", "val_frac", "test_frac", "val_max", "test_max", "split_group", "n_sweep", "refit")
RECIPE_FLAGS = ("ae_layout", "steps", "epochs", "eval_every", "patience", "fusion_batch", "lr", "weight_decay")


# ---------------------------------------------------------------------------------------------- faces
def extract(args, cache: FeatureCache, teachers, device, rank, world, log, donor=None) -> None:
    """Detect, align and run every teacher on this rank's unfinished shards (common.extract); with a donor
    (--faces-from), take the faces that cache found instead of detecting them."""
    opts = Options(align=args.align, min_face_prob=args.min_face_prob, batch=args.batch, workers=args.workers,
                   detect_size=args.detect_size, smallest_face=args.smallest_face, streams=args.streams)
    engine_extract(cache, teachers, device, opts, rank, world, log, faces_from=donor)


def faces_donor(args, plan: dict, images) -> FeatureCache:
    """The --faces-from cache, if it found the faces of these images with these detector settings (plan: the
    new cache's manifest, or what it will hold); else the run stops saying what differs (which files, too)."""
    if args.out is not None and Path(args.faces_from).resolve() == Path(args.out).resolve():
        raise SystemExit(f"error: --faces-from {args.faces_from} is --cache itself: name the other cache")
    try:
        donor = FeatureCache(args.faces_from)
        why = KnownFaces.differences(plan, donor.manifest) + list(donor.damaged_shards(every=True).values())
        if donor.manifest.get("list_hash") != plan["list_hash"]:
            why.append(list_changes(donor.path, images, plan["stamps"]))
    except (OSError, CacheMismatch) as e:
        raise SystemExit(f"error: --faces-from: {e}") from None
    if why:
        raise SystemExit(f"error: --faces-from {args.faces_from} cannot give this cache its faces: "
                         + "; ".join(why[:4]))
    return donor


def complete_cache_without_images(args):
    """(images, stamps) that the complete cache at --cache was made from, when --data is not there any more:
    G can be fitted anew on it (its features and crops need no image again), the plan checked as if every
    file were unchanged. None when --data is there, or there is no such cache (the usual checks follow)."""
    out = Path(args.out)
    if Path(args.data).exists() or args.overwrite or not (out / "manifest.json").is_file():
        return None
    if not read_manifest(out).get("complete") or not (out / "stamps.npy").is_file():
        return None
    for flag, asked in (("--retry-unreadable", args.retry_unreadable), ("--faces-from", args.faces_from),
                        ("--verify-crops", args.verify_crops)):
        if asked:
            raise SystemExit(f"error: {flag} reads images, and --data {args.data} is not there: put the images "
                             f"back (or name where they are now with --data), or drop {flag}")
    cache = FeatureCache(out)
    if damaged := cache.damaged_shards(every=True):
        k, why = next(iter(damaged.items()))
        raise SystemExit(f"error: {len(damaged)} shard(s) of {out} are damaged (shard {k}: {why}), and the images "
                         f"to extract them again are not at --data {args.data}")
    return cache.images, np.load(out / "stamps.npy")


def report_missed(cache: FeatureCache, run: Path, log) -> None:
    """List every image without a usable face (paper section 4.1 counts them; transfer.py applies the rule)."""
    m = write_missed(cache, run / "missed_faces.tsv")
    log.info(f"faces: {len(cache.images) - m.no_face - m.unusable - m.teachers} aligned; {m.kinds()} (listed in "
             f"{run / 'missed_faces.tsv'})")
    if m.unread:
        log.warning(f"{m.unread} of them could not be read at all (missing, permission denied, I/O error): "
                    f"once they read, rerun with --retry-unreadable to extract their shards again")


def refuse_to_delete(cache: Path, data) -> None:
    """--overwrite deletes a feature cache, nothing else: not a folder without a cache's manifest (a typo
    in --cache), and never the images (a cache inside the data folder, or the data inside the cache)."""
    if Path(cache).is_symlink():  # (rmtree refuses one, in a traceback; its folder is the user's to name)
        raise SystemExit(f"error: --overwrite would delete the cache through the symbolic link {cache} (to "
                         f"{Path(cache).resolve()}): nothing was deleted; give that folder as --cache")
    out, src = Path(cache).resolve(), Path(data).resolve()  # synth:N is a folder by now
    if out == src or out in src.parents or src in out.parents:
        raise SystemExit(f"error: --overwrite would delete {cache}, which holds or is inside the images of "
                         f"--data {data}: put the cache in a folder of its own")
    if not (out / "manifest.json").is_file():
        raise SystemExit(f"error: --overwrite deletes a feature cache, and {cache} is not one (no manifest.json): "
                         f"nothing was deleted; check --cache")
    others = [m.parent for m in out.rglob("manifest.json") if m.parent != out]
    if others:
        raise SystemExit(f"error: --overwrite would delete {cache} and the other caches inside it ({others[0]}"
                         + (f" and {len(others) - 1} more" if len(others) > 1 else "") + "): nothing was deleted; "
                         "give each cache a folder of its own")


# --------------------------------------------------------------------------------------------- fusion
def recipe_of(args, n_train: int) -> fusion.Recipe:
    steps = args.epochs * -(-n_train // args.fusion_batch) if args.epochs else args.steps
    return fusion.Recipe(layout=args.ae_layout, steps=max(1, steps), batch=args.fusion_batch, lr=args.lr,
                         weight_decay=args.weight_decay, eval_every=args.eval_every, patience=args.patience,
                         seed=args.seed)


def train_operator(op, d_in, d_out, data: Standardised, train, val, args, log, weight=None):
    """Fit one operator on the training faces; the validation faces choose its step (never the test faces).

    Its state is kept in the cache's fits/ folder: a rerun of a killed run resumes the fit it was in and
    loads the ones it had finished (any change of faces, units, recipe or weight starts a new fit)."""
    recipe = recipe_of(args, len(train))
    ckpt = fusion.fit_file(fusion.fits_folder(args.out / "fits"), op, d_in, d_out, data, train, val, recipe, weight)
    refitted = vars(args).setdefault("refitted", set())  # a sweep's fit that is the main one is not trained twice
    if args.refit and ckpt not in refitted:
        ckpt.unlink(missing_ok=True)
        refitted.add(ckpt)
    # a line a minute in a log without a terminal: minutes of G at scale are not minutes of silence
    bar = Progress(f"G[{op} {d_out}]", "step", recipe.steps)
    model, info = fusion.fit(op, d_in, d_out, data, train, val, recipe, weight, data.device, checkpoint=ckpt,
                             progress=lambda s, best: bar.update_to(s, best_val_mse=f"{best:.4f}"))
    bar.close()
    info["fit_file"] = ckpt.name
    if "best_step" in info:
        how = (f" (finished earlier: {ckpt})" if info.get("loaded") else
               f" (resumed at step {info['resumed_from_step']})" if "resumed_from_step" in info else "")
        log.info(f"G[{op}, {d_out}{', balanced' if weight is not None else ''}]: validation MSE {info['best_val_mse']:.4f} "
                 f"(G's units) at step {info['best_step']}"
                 + (f"; stopped early at step {info['steps_run']} of {recipe.steps}" if info["steps_run"] < recipe.steps
                    else f" of {info['steps_run']}")
                 + (f", hidden width {info['hidden']}" if "hidden" in info else "") + how)
    return model, info


@torch.no_grad()
def reconstruct(model, data: Standardised, rows) -> np.ndarray:
    """Reconstructed h_i of the given rows, back in the teachers' own units."""
    model.eval()
    out = [model.decode(model.encode(x)).cpu().numpy() for x in data.batches(rows, 4096)]
    return np.concatenate(out) * data.std + data.mean


def write_hG(cache: FeatureCache, op: str, model, d_in, data: Standardised, split, args, fit: str) -> None:
    """h_G of every face by operator `op`, into emb/<op>, shard by shard, plus G itself (its decoder serves
    distill.py's one-step variant).

    Written into a new folder that replaces emb/<op> in one atomic switch at the end: a rerun killed
    midway leaves the previous h_G whole, and distill.py never reads a half-written one."""
    found = cache.found
    held_out = np.union1d(split["val"], split["test"])  # distill.py holds out the faces G never trained on
    learnt = found & ~np.isin(np.arange(len(found)), held_out)  # and trains on the others
    s = ss = np.zeros(model.d_out)
    with cache.new_embedding(op) as folder, torch.no_grad():
        fusion.save(model, op, d_in, model.d_out, folder / "G.safetensors")
        np.savez(folder / "stats.npz", mean=data.mean, std=data.std, count=len(split["train"]))  # G's units
        for k in counted(range(cache.n_shards), f"write h_G[{op}]", "shard", cache.n_shards):
            lo, hi = int(cache.bounds[k]), int(cache.bounds[k + 1])
            rows = np.arange(lo, hi)
            h = np.zeros((hi - lo, model.d_out), np.float32)
            ok = found[lo:hi]
            if ok.any():
                h[ok] = np.concatenate([model.encode(x).cpu().numpy() for x in data.batches(rows[ok], 4096)])
            cache.write_embedding_shard(op, k, h, folder)
            x = h[learnt[lo:hi]].astype(cache.dtype).astype(np.float64)  # as stored, as distill.py reads it
            s, ss = s + x.sum(0), ss + (x * x).sum(0)
        np.save(folder / "val_rows.npy", held_out)
        # h_G's column sums over distill.py's training faces: its start need not read all of h_G (4 GB at 4 M)
        np.savez(folder / "target_sums.npz", sum=s, sumsq=ss, count=int(learnt.sum()))
        np.savez(folder / "split.npz", **split)
        cache.write_embedding_meta(op, {"op": op, "dim": int(model.d_out), "d_in": d_in, "teachers": cache.teachers,
                                          "val_frac": args.val_frac, "test_frac": args.test_frac, "seed": args.seed,
                                          "layout": args.ae_layout, "balance": args.balance,
                                          "split": {k: len(v) for k, v in split.items()}, "model": "G.safetensors",
                                          "fit": fit, "units": data.fingerprint,
                                          "content_hash": cache.manifest.get("content_hash")}, folder)


def fusion_choices(args, width: int) -> tuple[list[str], str, list[int]]:
    """(--ops, --write, --dim widths) checked against the teachers' total width: main asks before any
    extraction, so that a typo does not wait hours to show."""
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    if not ops:
        raise SystemExit(f"error: --ops names no operator (choose from {', '.join(fusion.OPERATORS)})")
    for op in ops:
        if op not in fusion.OPERATORS:
            raise SystemExit(f"error: --ops: unknown operator {op!r} (choose from {', '.join(fusion.OPERATORS)})")
    write = args.write or ops[0]
    if write not in fusion.OPERATORS:
        raise SystemExit(f"error: --write: unknown operator {write!r} (choose from {', '.join(fusion.OPERATORS)})")
    try:
        dims = [int(d) for d in args.dim.split(",") if d.strip()]
    except ValueError:
        raise SystemExit(f"error: --dim takes whole numbers separated by commas, got {args.dim!r}") from None
    for d in dims:
        if not 1 <= d <= width:  # G maps the h_i to at most as many dimensions as they have
            raise SystemExit(f"error: --dim {d}: h_G's width must be 1 or more" + (
                f", at most {width}, the teachers' total width" if math.isfinite(width) else ""))
    try:
        fusion.split_group(args.split_group)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    for flag, value in (("--val-max", args.val_max), ("--test-max", args.test_max)):
        if value < 2:  # else the run fails after all of G's training, on an empty set
            raise SystemExit(f"error: {flag} {value}: validation and test need at least 2 faces each")
    if args.val_frac + args.test_frac >= 1:
        raise SystemExit(f"error: --val-frac {args.val_frac} and --test-frac {args.test_frac} leave no face to train "
                         f"G on: their sum must be under 1")
    if len(dims) > 1 and ops[0] == "concat":  # it swept nothing: 0.000 at every width, each the same 'h_G'
        raise SystemExit(f"error: --dim {args.dim}: the width sweep fits --ops' first operator, and concat has no "
                         f"width (it keeps every dimension): put another operator first")
    n_sweep_sizes(args)
    return ops + ([write] if write not in ops else []), write, dims


def n_sweep_sizes(args) -> list[int]:
    """--n-sweep's corpus sizes, in increasing order (checked by fusion_choices before any extraction)."""
    try:
        sizes = sorted(float(n) for n in args.n_sweep.split(",") if n.strip())
    except ValueError:
        sizes = [0]
    if sizes and not all(math.isfinite(n) and n >= 1 and n == int(n) for n in sizes):
        raise SystemExit(f"error: --n-sweep {args.n_sweep!r}: write a comma list of face counts, e.g. 1000,3000,10000")
    return [int(n) for n in sizes]


def fit_and_report(cache: FeatureCache, args, device, run: Path, log) -> None:
    d_in = cache.dim
    ops, write, dims = fusion_choices(args, d_in)
    mean_width = round(d_in / len(cache.teachers))
    dims = dims or [mean_width]
    rows = np.flatnonzero(cache.found)
    if len(rows) < 10:
        raise SystemExit(f"error: only {len(rows)} faces were found in {cache.data_root}: too few to train G")
    group = fusion.split_group(args.split_group)
    drawn = fusion.draws(cache.images, rows, args.seed, group)  # one pass over 4 M paths, for the split and sweeps
    groups = None  # each face's group (its number), for the counts and --n-sweep
    if group is not None:
        groups = np.zeros(len(cache.images), np.uint64)
        groups[rows] = drawn[1]
    try:
        split = fusion.three_way_split(cache.images, rows, args.seed, args.val_frac, args.test_frac,
                                       args.val_max, args.test_max, group, drawn)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    train, val, test = split["train"], split["val"], split["test"]
    n_sweep = n_sweep_sizes(args)
    if n_sweep and n_sweep[-1] > len(train) + len(val):
        raise SystemExit(f"error: --n-sweep {n_sweep[-1]}: only {len(train) + len(val)} faces outside the test set: "
                         f"sweep {len(train) + len(val)} or fewer (the cache is complete: a rerun only fits G)")
    for n in n_sweep:  # before anything trains: a sweep that cannot run must not cost the operators' training
        a, b = sweep_sets(split, args, n, groups=groups)
        if min(len(a), len(b)) < 2:
            raise SystemExit(f"error: --n-sweep {n}: {len(a)} training and {len(b)} validation faces; use a larger N")
    sizes = {k: len(v) for k, v in split.items()}
    record = {**sizes, "seed": args.seed, "val_frac": args.val_frac, "test_frac": args.test_frac}
    if group is not None:  # a pattern that ties nothing together leaks near-duplicates
        record["split_group"], record["groups"] = args.split_group, {k: len(np.unique(groups[v]))
                                                                     for k, v in split.items()}
        log.info(f"G's split keeps --split-group {args.split_group} whole: {record['groups']['train']} training, "
                 f"{record['groups']['val']} validation and {record['groups']['test']} test groups")
        if record["groups"] == sizes:
            log.warning(f"warning: --split-group {args.split_group} put every face in a group of its own: no two "
                        f"faces are held together (a pattern that matches no path, or a tree without subfolders)")
    write_json(run / "split.json", record)
    layout = f"; autoencoder layout {args.ae_layout}" if set(ops) & set(fusion.AUTOENCODERS) else ""
    log.info(f"G: {sizes['train']} training faces, {sizes['val']} validation (step choice), {sizes['test']} test "
             f"(Table 5); input {d_in}, h_G {dims[0]} (mean teacher width {mean_width}){layout}")
    if max(dims) >= sizes["train"]:  # PCA's rank, which the residual autoencoder starts from
        log.warning(f"warning: h_G is up to {max(dims)} wide but G trains on {sizes['train']} faces: a linear G "
                    f"varies along at most {sizes['train'] - 1} of its dimensions on them, the rest stay "
                    f"(nearly) constant; more faces, or a smaller --dim, use the width")
    data = Standardised(cache, device, fusion.block_units(cache, train))
    freed = fusion.prune_fits(args.out / "fits")
    if freed:
        log.info(f"fits/: removed {freed / 2**20:.1f} MiB of fit states no fit of this version can read")
    slices = cache.slices()
    x_test = cache.features.take(test).astype(np.float64)
    balanced = fusion.block_weights([t["dim"] for t in cache.teachers])
    variants = {"none": [None], "equal": [balanced], "both": [None, balanced]}[args.balance]

    table, models, infos = {}, {}, {}
    for op in ops:
        for w in variants:
            col = op if w is None else f"{op}+bal"
            models[col], infos[col] = train_operator(op, d_in, dims[0], data, train, val, args, log, w)
            table[col] = fusion.nrmse_per_block(reconstruct(models[col], data, test), x_test, data.mean, slices)
    md = fusion.table5({c.upper().replace("+BAL", " bal"): table[c] for c in table})
    note = ("; 'bal': every teacher's block weighs the same in the loss" if args.balance != "none" else "")
    note += f"; CONCAT keeps all {d_in} dimensions" if "concat" in ops else ""
    width = d_in if set(ops) == {"concat"} else dims[0]
    caption = (f"Reconstruction normalised RMSE on {len(test)} test faces (h_G width {width}), as in Table 5. G "
               f"trained on {len(train)} faces, steps chosen on {len(val)} validation faces{layout}{note}")
    write_text(run / "table5.md", f"{caption}\n\n{md}\n")
    write_json(run / "table5.json", {"dim": dims[0], "widths": {c: int(m.d_out) for c, m in models.items()},
                                     "n_test": len(test), "split": sizes, "layout": args.ae_layout,
                                     "teachers": cache.teachers, "nrmse": table, "training": infos})
    log.info(f"{caption}\n{md}")  # the screen's table says what it measures, as the file's does

    if not args.extract_only:  # before the sweeps: their hours (or a failure in them) must not cost h_G
        name = write if variants[0] is None else f"{write}+bal"
        # A rerun that loaded the very fit (and units) the current h_G came from keeps it: at 4.12 M faces
        # writing it again is a pass over the cache and 8 GB of writes.
        try:
            done = cache.embedding(write)[1] if write in cache.embedding_names() else {}
        except CacheDamaged as e:
            log.warning(f"warning: h_G ({write}) is damaged ({'; '.join(e.problems)}): it is written anew")
            done = {}
        same = done.get("fit") == infos[name]["fit_file"] and done.get("units") == data.fingerprint
        if infos[name].get("loaded") and same:
            log.info(f"h_G ({name}) in {cache.path / 'emb' / write} comes from this same fit: kept as it is")
        else:
            write_hG(cache, write, models[name], d_in, data, split, args, infos[name]["fit_file"])
            log.info(f"h_G ({name}, width {models[name].d_out}) written to {cache.path / 'emb' / write}")
        cache.mark_default_embedding(write)
        # which h_G this run's Table 5 column became: the version students and transfer reports name
        write_json(run / "h_G.json", {"column": name, "cache": str(cache.path.resolve()), "name": write,
                                      "version": cache.embedding_dir(write).name, "width": int(models[name].d_out)})
    # the sweeps fit G as h_G's is fitted: balanced with --balance equal (with both, h_G's is the plain one)
    if len(dims) > 1:
        sweep_dims(cache, ops[0], dims, data, train, val, test, x_test, slices, args, run, log, variants[0])
    if n_sweep:
        sweep_n(cache, ops, n_sweep, dims[0], data, split, slices, args, run, log, variants[0], groups)


def sweep_dims(cache, op, dims, data, train, val, test, x_test, slices, args, run, log, weight=None) -> None:
    """Figure 2's reconstruction part: error against the width of h_G (its transfer curves need a student
    distilled per width)."""
    results = []
    dims = sorted(dims)
    for d in dims:
        model, _ = train_operator(op, cache.dim, d, data, train, val, args, log, weight)
        err = fusion.nrmse_per_block(reconstruct(model, data, test), x_test, data.mean, slices)
        results.append({"dim": d, **err, "average": fusion.average_nrmse(err)})
    write_json(run / "dim_sweep.json", results)
    head = ["h_G width"] + list(slices) + ["Average"]
    md = fusion.error_table([[r["dim"]] + [r[n] for n in slices] + [r["average"]] for r in results], head)
    write_text(run / "dim_sweep.md", f"Normalised RMSE of G ({op}{', balanced' if weight is not None else ''}) on "
                                     f"{len(test)} test faces against the width of h_G\n\n{md}\n")
    plots.lines(run / "dim_sweep.png", dims, {n: [r[n] for r in results] for n in list(slices) + ["average"]},
                "width of h_G", "test normalised RMSE",
                f"Reconstruction error of G ({op}{', balanced' if weight is not None else ''}) vs h_G width", logx=True)
    log.info(f"width sweep {dims}: average NRMSE {[round(r['average'], 3) for r in results]} -> {run / 'dim_sweep.png'}")


def sweep_sets(split, args, n, keys=None, groups=None):
    """(training, validation) faces of an --n-sweep corpus of n: the first n of a seeded order of the non-test
    faces, every (1 / val_frac)-th of them a validation face up to val_max. Each smaller corpus is part of the
    larger ones, and each has its own share of validation faces: the main split's, capped at val_max for
    the whole corpus, would leave a small one a handful (5 of 1,000 at the paper's 4.12 M faces).
    With --split-group (keys: the cache's image paths, or groups: each row's group, any label) the order and the
    roles go by whole groups, as in the main split: a person's or a video's faces never sit on both sides."""
    pool = np.union1d(split["train"], split["val"])
    rng = np.random.default_rng(args.seed)
    group = fusion.split_group(getattr(args, "split_group", "image"))
    if group is None:  # each face its own group
        order = rng.permutation(pool)
        place = np.arange(len(order))
    else:
        labels = groups[pool] if groups is not None else np.array([group(keys[r]) for r in pool], dtype=object)
        g = fusion.first_seen_ids(labels)
        place = rng.permutation(int(g.max()) + 1 if len(g) else 0)[g]  # each group's place in a seeded order
        by = np.argsort(place, kind="stable")
        order, place = pool[by], place[by]
    every = max(2, round(1 / args.val_frac)) if args.val_frac > 0 else len(pool) + 1
    size = np.bincount(place)
    val_group = np.arange(len(size)) % every == 0
    before = np.cumsum(size * val_group) - size * val_group  # validation faces of the groups placed before
    is_val = (val_group & (before < args.val_max))[place[:n]]
    pool = order[:n]
    return np.sort(pool[~is_val]), np.sort(pool[is_val])


def sweep_n(cache, ops, sizes, dim, data, split, slices, args, run, log, weight=None, groups=None) -> None:
    """Error of each operator against the number of faces G learns from, on one fixed set of test faces.

    Corpus size N counts G's training plus validation faces (sweep_sets), never a test face; each N is
    put in units of its own training faces (fusion.block_units), as the main run is."""
    test = split["test"]
    x_test = cache.features.take(test).astype(np.float64)
    results = []
    for n in sizes:
        train, val = sweep_sets(split, args, n, groups=groups)
        data = Standardised(cache, data.device, fusion.block_units(cache, train))
        row = {"N": n, "n_train": len(train), "n_val": len(val)}
        for op in ops:
            t0 = time.perf_counter()
            model, info = train_operator(op, cache.dim, dim, data, train, val, args, log, weight)
            err = fusion.nrmse_per_block(reconstruct(model, data, test), x_test, data.mean, slices)
            # a fit loaded from an earlier run took no time here; a resumed one, the rest of its steps
            seconds = None if info.get("loaded") else time.perf_counter() - t0
            row[op] = {**err, "average": fusion.average_nrmse(err), "seconds": seconds,
                       **{k: v for k, v in info.items() if k in ("best_step", "steps_run", "hidden", "loaded",
                                                                 "resumed_from_step")}}
        results.append(row)
        log.info(f"N={n}: average test NRMSE " + ", ".join(f"{op} {row[op]['average']:.3f}" for op in ops))
        autoencoder = set(ops) & set(fusion.AUTOENCODERS)
        write_json(run / "n_sweep.json", {"dim": dim, "n_test": len(test), "layout": args.ae_layout if autoencoder else None,
                                          "balanced": weight is not None,
                                          "teachers": [t["name"] for t in cache.teachers], "results": results})
    head = ["N (train + val)"] + [op.upper() for op in ops]
    rows = [[f"{r['N']} ({r['n_train']} + {r['n_val']})"] + [r[op]["average"] for op in ops] for r in results]
    md = fusion.error_table(rows, head)
    bal = ", teachers balanced" if weight is not None else ""
    bal += f", autoencoder layout {args.ae_layout}" if set(ops) & set(fusion.AUTOENCODERS) else ""
    bal += f"; CONCAT keeps all {cache.dim} dimensions" if "concat" in ops else ""
    write_text(run / "n_sweep.md", f"Average normalised RMSE on the same {len(test)} test faces, h_G width "
                                   f"{dim}{bal}\n\n{md}\n")
    plots.lines(run / "n_sweep.png", sizes, {op.upper(): [r[op]["average"] for r in results] for op in ops},
                "faces G learns from (N)", "test normalised RMSE",
                f"Reconstruction error of G vs corpus size (h_G width {dim})", logx=True)
    log.info("\n" + md)


def list_teachers() -> None:
    rows = [[s.name, s.role, s.dim, s.input_size, s.runtime + (f" (CPU: {s.reference})" if s.reference else ""), s.pip,
             s.name in DEFAULT_TEACHERS] for s in REGISTRY.values()]
    print(tabulate(rows, headers=["teacher", "role", "width", "input", "runtime", "weights from", "default"]))


def extraction_settings(args) -> None:
    """Fills the extraction flags left out (None) with those the existing --cache was made with, else the
    defaults (EXTRACTION), and checks the detector's."""
    made = {}
    if not args.overwrite and (Path(args.out) / "manifest.json").is_file():
        try:
            made = as_planned(read_manifest(args.out))
        except (OSError, CacheMismatch):
            made = {}  # a damaged manifest: create_or_resume says what is wrong with it
    args.align = args.align or made.get("align") or EXTRACTION["align"]
    detector = [f"--{f.replace('_', '-')}" for f in DETECTOR_FLAGS if getattr(args, f) is not None]
    if args.align == "none" and detector:  # (args.json recorded them, as if they had been used)
        made_so = (f" (--cache {args.out} was made so; --overwrite --align mtcnn makes it anew with the detector)"
                   if made.get("align") == "none" else "")
        raise SystemExit(f"error: {', '.join(detector)}: for the face detector, which --align none does not run"
                         f"{made_so}: drop {'them' if len(detector) > 1 else 'it'}")
    for flag, default in EXTRACTION.items():
        # the detector's settings of a cache made another way are no setting of this one's (--align none then
        # refused --smallest-face, a flag never given): the cache's mismatch is what is said
        detector = flag in DETECTOR_FLAGS and made.get("align") != args.align
        if getattr(args, flag) is None:
            setattr(args, flag, default if made.get(flag) is None or detector else made[flag])
    if why := detection_problem(args.align, args.detect_size, args.smallest_face):
        raise SystemExit(f"error: {why}")
    if args.align == "none":  # nothing is detected: args.json records no detector setting, as the manifest does
        for flag in DETECTOR_FLAGS:
            setattr(args, flag, None)


REPORTS = ("table5.md", "table5.json", "h_G.json", "split.json", *(f"{sweep}_sweep.{ext}" for sweep in ("dim", "n")
                                                                   for ext in ("md", "json", "png")))


def set_aside(run: Path) -> Path:
    """Move a finished run's args.json and tables into RUN/replaced-TIME/, not delete them: the run replacing
    them may yet stop after its extraction (too few faces found to fit G) and leave no tables of its own."""
    aside = stamped_folder(run, "replaced")
    for name in ("args.json", *REPORTS):
        if (run / name).exists():
            (run / name).replace(aside / name)
    return aside


def another_finished_run(args) -> bool:
    """Whether --run-dir holds the tables of a run with other arguments, which this one replaces (the same
    arguments: a killed run continued; its table5.json is written before h_G and the sweeps)."""
    if args.run_dir is None or not (Path(args.run_dir) / "table5.json").is_file():
        return False
    if (old := recorded_args(args.run_dir)) is None:
        return True
    old, now = comparable(args, old, parse_args([]))
    # how it ran, not what it gives (the same cache and tables), and what neither run read (a run recorded
    # before such a flag was refused, or before --align none recorded no detector setting)
    moot = {"run_dir", "device", "workers", "batch", "streams", "verify_crops",
            *(f for flags, _ in unread_rules(args) if flags is not FIT_FLAGS for f in flags),
            *(DETECTOR_FLAGS if args.align == "none" == old.get("align") else ())}
    return any(old.get(k) != v for k, v in now.items() if k not in moot)


def data_and_cache(args, rank: int, world: int) -> None:
    """Settle --data and --cache: a cache's own images when only --cache is given, the embedded demo faces
    (feats/demo) when neither is, synth:N faces made once, else a cache folder named after the images."""
    if args.data is None and args.out is not None and (args.out / "manifest.json").is_file():
        args.data = Path(read_manifest(args.out)["data_root"])  # G fitted anew on a cache: its own images
    if args.data is None:
        from common.demo import build_demo_faces

        args.data = build_demo_faces() if rank == 0 else Path("data/demo_faces")
        if world > 1:
            dist.barrier()
        args.out = args.out or Path("feats/demo")
    n_synth = synth.parse(args.data)
    if n_synth:
        root = synth.default_root(n_synth, args.synth_size, args.seed)
        args.data = synth.ensure(n_synth, root, args.synth_size, args.seed) if rank == 0 else root
        if world > 1:
            dist.barrier()
        args.out = args.out or Path("feats") / root.name
    if args.out is None:
        # a folder of its own under feats/, never feats/ itself (--overwrite would take the demo's and the
        # task caches with it), nor the demo's or the task caches' own names; a cache that an older version
        # put in feats/ itself for these images is resumed where it is
        old = Path("feats")
        if (old / "manifest.json").is_file() and read_manifest(old).get("data_root") == str(Path(args.data).resolve()):
            args.out = old
        else:
            name = Path(args.data).resolve().name
            args.out = Path("feats") / (f"{name}-faces" if name in ("demo", "tasks") else name)


@holding_runs
def main(argv=None):
    args = parse_args(argv)
    if args.list_teachers:
        return list_teachers()
    # a typo in --ops, --dim ... is told at once, before the teachers load (15 s) or the demo faces are copied
    # (with --extract-only too: it went unsaid); the width bound comes with the teachers
    fusion_choices(args, math.inf)
    rank, world = dist_info()
    device = pick_device(args.device)
    if world > 1:
        # The other ranks wait at barriers while rank 0 alone lists and checks the images and cache (with
        # --verify-crops, reads the whole crop store), and while the slowest rank ends its shards: hours at
        # millions of faces, past torch's default of 10 minutes (NCCL). A rank that fails ends them all anyway
        # (torchrun stops the job), so the long wait costs nothing then.
        init_dist(device, timeout=datetime.timedelta(days=7))
    data_and_cache(args, rank, world)
    if args.out.exists() and not args.out.is_dir():
        raise SystemExit(f"error: --cache {args.out} is a file: name a folder for the cache")
    extraction_settings(args)
    if args.overwrite and args.run_dir and Path(args.run_dir).resolve().is_relative_to(Path(args.out).resolve()):
        raise SystemExit(f"error: --run-dir {args.run_dir} is inside --cache {args.out}, which --overwrite deletes: "
                         f"give the run a folder of its own")
    early, donor, kept, stamps = [], None, None, None
    if rank == 0:  # the other ranks open what rank 0 checked: N processes stat-ing 4 M files is N times the load
        if kept := complete_cache_without_images(args):
            images, stamps = kept
        else:
            with kept_warnings() as early:  # images left out by the listing are named in the run's log.txt too
                images = list_images(args.data)
        if not images:
            raise SystemExit(f"error: no images ({', '.join(sorted(e[1:] for e in IMAGE_EXTENSIONS))}; files and "
                             f"folders whose names start with a dot are left out) under {args.data}")
    extra = load_config(args.teachers_config) if args.teachers_config else []
    if args.teachers is None and not extra and not args.overwrite and (args.out / "manifest.json").is_file():
        recorded = read_manifest(args.out)["teachers"]  # G fitted anew on a cache: its teachers (named in args.json)
        names, args.teachers = [cached_teacher(t) for t in recorded], ",".join(t["name"] for t in recorded)
    else:
        args.teachers = ",".join(DEFAULT_TEACHERS) if args.teachers is None else args.teachers
        names = [n.strip() for n in args.teachers.split(",") if n.strip()]
    if not names + extra and not args.extract_only:  # --extract-only without teachers: the crop store alone
        raise SystemExit("error: --teachers names no teacher: G fuses at least one (see --list-teachers)")
    teachers = build_teachers(names + extra, device)  # before the run folder: a typo leaves no empty one
    if not args.extract_only:
        fusion_choices(args, sum(t.dim for t in teachers))
    if rank == 0 and not args.extract_only and (sweep := n_sweep_sizes(args)):  # its faces are fewer than images
        outside = len(images) - fusion.held_out_size(len(images), args.test_frac, args.test_max)
        if sweep[-1] > outside:
            raise SystemExit(f"error: --n-sweep {sweep[-1]}: {len(images)} images leave at most {outside} faces "
                             f"outside the test set (--test-frac {args.test_frac:g}); sweep fewer, or bring more images")
        if fusion.split_group(args.split_group) is None:  # each face its own group: the roles depend on N alone
            for n in sweep:  # (refused after the whole extraction, by fit_and_report's same check)
                a, b = sweep_sets({"train": np.arange(n), "val": np.arange(0)}, args, n)
                if min(len(a), len(b)) < 2:
                    raise SystemExit(f"error: --n-sweep {n}: {len(a)} training and {len(b)} validation faces; use "
                                     f"a larger N")
    if rank == 0 and not args.extract_only and (group := fusion.split_group(args.split_group)) is not None:
        # G's split needs a group for test, one for validation and one to train on: with fewer (a flat tree and
        # --split-group folder) it stopped after the whole extraction
        if (n := len({group(p) for p in images})) < 3:
            raise SystemExit(f"error: --split-group {args.split_group} ties the {len(images)} images into {n} "
                             f"group{'s' if n != 1 else ''}; G's split needs 3 or more (test, validation, training)")
    if rank == 0:
        plan = make_plan(args.data, images, teachers, args.shard_size, args.dtype, args.align, args.min_face_prob,
                         args.crop_size, args.detect_size, args.smallest_face, stamps=stamps)
        # before the run folder, and before --overwrite deletes anything
        donor = faces_donor(args, plan, images) if args.faces_from is not None else None
        # after every check (a refused run leaves nothing): a second fuse.py on one cache would extract, fit G
        # and write h_G into the same files
        locked = hold(args.out, lock_file(args.out),
                      f"error: another fuse.py run is writing the cache {args.out}: wait for it to end, or give this "
                      f"one another --cache")
        if rewrites := [f for f, on in (("--overwrite", args.overwrite), ("--retry-unreadable", args.retry_unreadable),
                                         ("--verify-crops", args.verify_crops)) if on]:
            hold(args.out, readers_lock_file(args.out),
                 f"error: a distill.py or transfer.py run is reading the cache {args.out}, whose files "
                 f"{' and '.join(rewrites)} may delete or write anew: wait for it to end, or give this run another "
                 f"--cache")
        if donor is not None:  # not deleted under this run by a fuse.py --overwrite of it
            hold_for_reading(donor.path)
        if why := run_dir_problem(args.run_dir, "fuse"):  # before the deletion: refused after it, it cost the cache
            raise SystemExit(why)
        if args.overwrite and args.out.exists():
            refuse_to_delete(args.out, args.data)
            shutil.rmtree(args.out)
        try:  # before the run folder: a refused resume leaves none behind
            cache = FeatureCache.create_or_resume(args.out, args.data, images, teachers, plan=plan,
                                                  appeared_ok=args.retry_unreadable, locked=locked)
        except CacheMismatch as e:
            raise SystemExit(f"error: {e}")
    # a table this run does not make (a sweep, h_G.json) would pass for one of its own
    aside = set_aside(Path(args.run_dir)) if rank == 0 and another_finished_run(args) else None
    run = make_run_dir(args.run_dir, "fuse", args) if rank == 0 else None
    if world > 1:  # every rank logs into the run's log.txt: a warning or error of rank 1 is part of the record
        box = [run]
        dist.broadcast_object_list(box)
        run = box[0]
    log = get_logger(run, f"fuse{rank}", early if rank == 0 else (), rank)
    if rank == 0:
        if aside:  # the tables are a report of the cache, remade from it: replaced, the log going on
            log.warning(f"warning: --run-dir {run} holds a finished fuse.py run of other arguments: its args.json and "
                        f"tables are moved to {aside} (its log.txt goes on below); another --run-dir keeps them apart")
        log.info("teachers: " + ", ".join(f"{t.name} ({t.dim})" for t in teachers) + f" on {device}; "
                 f"{len(images)} images")
        if kept:
            log.warning(f"warning: --data {args.data} is not there: the complete cache {args.out} is taken as it was "
                        f"made (its features and crops; no image is read, so files changed since go unnoticed)")
        cache.remove_damaged(log)  # headers and sizes only: a resume does not read the whole cache
        if args.retry_unreadable:
            cache.remove_unread(log)
        if args.verify_crops and not cache.crop_size:
            log.warning(f"warning: --verify-crops: {args.out} keeps no crop store (made with --crop-size 0): nothing "
                        f"to verify")
        elif args.verify_crops and not any(cache.shard_done(k) for k in range(cache.n_shards)):
            log.warning(f"warning: --verify-crops: no shard of {args.out} is extracted yet: nothing to verify")
        elif args.verify_crops and not cache.remove_altered_crops(log):
            log.info("crop store verified: every shard's crops match their recorded sha256")
        del images, plan  # the cache holds the paths as one buffer: 4 M names as Python strings were ~0.45 GB
    if world > 1:  # a rank 0 that stopped above stops them all (torchrun ends the others)
        dist.barrier()
    if rank != 0:
        cache = FeatureCache(args.out)
        donor = FeatureCache(args.faces_from) if args.faces_from is not None else None
    extract(args, cache, teachers, device, rank, world, log, donor)
    if world > 1:
        dist.barrier()
    if rank != 0:
        dist.destroy_process_group()
        return
    cache.finalize()
    report_missed(cache, run, log)
    log.info(f"feature cache complete: {cache.path} ({len(cache.images)} images x {cache.dim} dims, {cache.dtype})")
    if not args.extract_only:
        fit_and_report(cache, args, device, run, log)
    if world > 1:
        dist.destroy_process_group()
    log.info(f"run folder: {run}")


if __name__ == "__main__":
    run_main(main)

"""The whole data path on N real faces: extraction (fuse.py's engine) and distillation training steps.

A folder of N images is made from the embedded demo media (repeated; some hold no face, on purpose).
Each stage is timed on its own over the folder (read, decode, detect, align, each teacher, write), then
the engine end to end, against the per-image path the project had before the engine (PIL decode,
full-resolution MTCNN and cv2 warp one image at a time, teachers in batches), timed in the same run on
the first --old-n images. Distillation is timed over --steps steps of distill.py's train_step fed from
the crop store with device augmentation, and fed from transfer.py's fine-tuning loader, against the old
loader (decode the image, warp it, torchvision v2 transforms per sample) and against train_step alone
on one batch already on the device (the ceiling); the rows repeat as needed, after --warmup untimed steps. Rates count images per second for
read, decode, detect and extraction end to end (whose note gives faces/s too), faces per second for
align, the teachers, the write and distillation; the hours are
projected for the paper's 4.12 M faces (extraction once, distillation 40 epochs).

  python bench/pipeline.py --n 64                     # the CPU, small
  python bench/pipeline.py --n 2048 --batch 256 --workers 12      # a GPU, the six default teachers
  ... --streams 1,2,3          # also the engine end to end with 1, 2, 3 batches in flight (fuse.py --streams)
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.align import CANON, CROP_SIZE, SMALLEST_FACE, TEMPLATE, BatchDetector, FaceDetector, warp, warp_batch  # noqa: E402
from common.cache import FeatureCache  # noqa: E402
from common.extract import Options, Stages, extract  # noqa: E402
from common.facedata import AlignedFaces, EpochSampler, first, to_device_pixels  # noqa: E402
from common.images import decode_image, decode_jpegs_on, list_images, nvjpeg_safe, read_bytes  # noqa: E402
from common.runs import POSITIVE_INT, HelpFormatter, pick_device  # noqa: E402
from common.student import build_student  # noqa: E402
from common.teachers import DEFAULT_TEACHERS, build_teachers  # noqa: E402

PAPER_FACES = 4.12e6
PAPER_EPOCHS = 40


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--n", type=int, default=64, help="images in the folder (the demo media, repeated)")
    p.add_argument("--teachers", default=",".join(DEFAULT_TEACHERS), help="teachers run by the extraction")
    p.add_argument("--batch", type=int, default=32, help="images per extraction batch and per training step")
    p.add_argument("--workers", type=int, default=0, help="loader processes (extraction and training)")
    p.add_argument("--size", type=int, default=112, help="student input side")
    p.add_argument("--detect-sizes", default="",
                   help="also time batched detection at these longer sides (comma list), beside the engine's own")
    p.add_argument("--smallest-faces", default="",
                   help="also time batched detection at the engine's detect size skipping MTCNN's pyramid levels for "
                        "faces under these sizes (comma list of pixels, fuse.py --smallest-face), against all levels")
    p.add_argument("--profile-detect", action="store_true",
                   help="also profile one batch of batched detection (torch.profiler: the busiest ops on the CPU and "
                        "the device, and how much of the wall time the device was busy)")
    p.add_argument("--mixed-sizes", action="store_true",
                   help="rescale each copy of the demo media by its own factor (0.35-1.6), so that image sizes vary "
                        "as in scraped corpora (the demo media alone is 94%% frames of one size)")
    p.add_argument("--make-folder", type=Path, metavar="DIR",
                   help="only write the folder of --n images into DIR (for timing fuse.py itself) and exit")
    p.add_argument("--old-n", type=POSITIVE_INT, default=256,
                   help="images timed through the per-image paths of before (the first of the folder; they are slow)")
    p.add_argument("--steps", type=int, default=40,
                   help="training steps timed reading the crop store, and with synthetic batches (train_step alone)")
    p.add_argument("--old-steps", type=int, default=10, help="training steps timed with the loader of before")
    p.add_argument("--warmup", type=int, default=5,
                   help="untimed training steps first (worker start, cuDNN autotuning); rows repeat to fill them")
    p.add_argument("--streams", default="1",
                   help="also run the engine end to end, untimed per stage, with these numbers of batches in flight "
                        "(comma list, fuse.py --streams); each ratio is against the first value, in this run")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda ...")
    p.add_argument("--out", type=Path, help="also write the table (markdown) here")
    return p.parse_args(argv)


def make_folder(n: int, dest: Path, mixed: bool = False) -> Path:
    """n images of the demo media, repeated. mixed: each copy rescaled by its own factor (0.35 to 1.6,
    drawn from its index), so that nearly every image has a size of its own, as in scraped face corpora;
    the demo media alone is 94% video frames of one size."""
    from PIL import Image

    from common.demo import build_demo_faces

    src = build_demo_faces()
    names = list_images(src)

    def one(i):
        name = names[i % len(names)]
        out = dest / f"{i:06d}_{Path(name).name}"
        if not mixed:
            return shutil.copyfile(src / name, out)
        img = Image.open(src / name)
        f = np.random.default_rng(i).uniform(0.35, 1.6)
        img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.LANCZOS).save(out, quality=95)
    with ThreadPoolExecutor(os.cpu_count()) as pool:  # PIL resizes and encodes outside the GIL
        list(pool.map(one, range(n)))
    return dest


class GpuUtil:
    """Mean GPU utilisation sampled every 0.1 s while active (needs pynvml; else 'not measured')."""

    def __init__(self, device):
        self.samples, self.ok = [], device.type == "cuda"
        if self.ok:
            try:
                torch.cuda.utilization(device)
            except Exception:
                self.ok = False
        self.device = device

    def __enter__(self):
        self.stop = threading.Event()
        if self.ok:
            def loop():
                while not self.stop.wait(0.1):
                    self.samples.append(torch.cuda.utilization(self.device))
            self.thread = threading.Thread(target=loop, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()

    def text(self):
        return f"{np.mean(self.samples):.0f}%" if self.ok and self.samples else "not measured"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def count_ops(fn):
    """(aten ops dispatched, views included; those the host waits on: a value read back, a shape that
    depends on the data) while fn runs: on a GPU each of the latter is a round trip that idles the device."""
    from torch.utils._python_dispatch import TorchDispatchMode

    # item and is_nonzero: inference mode's spellings of a value read back (BatchDetector runs in it); a
    # Tensor.tolist or a copy to the host dispatches no op here on the CPU and is not counted
    waits = {"aten.nonzero.default", "aten.equal.default", "aten._local_scalar_dense.default",
             "aten.item.default", "aten.is_nonzero.default", "aten.masked_select.default"}

    class Count(TorchDispatchMode):
        ops, wait = 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            name = str(func)
            Count.wait += name in waits or (name == "aten.index.Tensor" and any(
                isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in args[1]))
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.ops, Count.wait


@contextlib.contextmanager
def gpu_code_path():
    """On the CPU, batched detection as it runs on a GPU: resizes from a summed-area table, nms_by_image, the
    GPU's price of a pass (so the same passes). Its op and wait counts do not depend on the machine."""
    from unittest import mock

    from common import align, mtcnn

    def nms(boxes, scores, image, threshold, overlap="iou", within=None, groups=1):
        return mtcnn.nms_by_image(boxes, scores, image if within is None else image * groups + within, threshold,
                                  overlap=overlap)

    resizer = mtcnn.Resizer.__init__
    with mock.patch.object(align, "DETECT_CALL_CPU", align.DETECT_CALL), mock.patch.object(mtcnn, "_nms", nms), \
            mock.patch.object(mtcnn.Resizer, "__init__", lambda self, imgs, table: resizer(self, imgs, True)):
        yield


def profile_detect(det, images, device):
    """Where one batch of detection spends its time: torch.profiler's busiest ops, and the device's busy
    share; and how many ops it dispatches and waits on (on the CPU, those of the GPU's code path too)."""
    from torch.profiler import ProfilerActivity, profile

    det(images)  # warm-up
    sync(device)
    ops, waits = count_ops(lambda: det(images))
    print(f"\none detection batch ({len(images)} images) dispatches {ops} aten ops (views included); the host "
          f"waits on {waits} of them")
    if device.type == "cpu":
        with gpu_code_path():
            ops, waits = count_ops(lambda: det(images))
        print(f"with a GPU's code path (run here on the CPU): {ops} aten ops, {waits} host waits")
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        det(images)
        sync(device)
    wall = time.perf_counter() - t0
    ops = prof.key_averages()
    print(f"\nprofile of one detection batch ({len(images)} images): {wall * 1000:.1f} ms wall (profiled)")
    if cuda and len(ops):
        key = "self_device_time_total" if hasattr(ops[0], "self_device_time_total") else "self_cuda_time_total"
        busy = sum(getattr(e, key) for e in ops) / 1e6  # microseconds
        print(f"device busy {busy * 1000:.1f} ms ({busy / wall:.0%} of the wall time)")
        print(ops.table(sort_by=key, row_limit=12))
    print(ops.table(sort_by="self_cpu_time_total", row_limit=12), flush=True)


def landmark_shift(ref, other):
    """Largest distance between the image points that two alignment matrices send to the crop's five
    template points, over the eye distance of the first: how far a coarser detection moves the crop."""
    pts = [np.c_[TEMPLATE, np.ones(5)] @ np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2].T for m in (ref, other)]
    return float(np.abs(pts[0] - pts[1]).max() / np.linalg.norm(pts[0][1] - pts[0][0]))


def rate(n, seconds):
    return n / max(seconds, 1e-9)


def main(argv=None):
    args = parse_args(argv)
    if args.make_folder:
        args.make_folder.mkdir(parents=True, exist_ok=True)
        print(f"{len(list_images(make_folder(args.n, args.make_folder, args.mixed_sizes)))} images in {args.make_folder}")
        return
    device = pick_device(args.device)
    torch.manual_seed(0)
    rows = []  # (stage, path, per second, note)

    def add(row):  # printed as it comes too, so that a run cut short still tells what it measured
        rows.append(row)
        value = f"{row[2]:,.1f}/s" if isinstance(row[2], (int, float)) else row[2]
        print(f"{row[0]} | {row[1]} | {value} | {row[3]}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="facekd-bench-"))
    try:
        (work / "faces").mkdir()
        folder = make_folder(args.n, work / "faces", args.mixed_sizes)
        names = list_images(folder)
        teachers = build_teachers([t.strip() for t in args.teachers.split(",") if t.strip()], device)

        # ---- stages, each on its own
        t0 = time.perf_counter()
        datas = [read_bytes(folder / n) for n in names]
        add(("read", "files", rate(len(names), time.perf_counter() - t0), ""))
        t0 = time.perf_counter()
        images = [decode_image(d) for d in datas]
        add(("decode", "PIL, one core", rate(len(names), time.perf_counter() - t0), ""))
        if device.type == "cuda":
            jpegs = [d for d in datas if nvjpeg_safe(d)]
            decode_jpegs_on(jpegs[: args.batch], device)  # warm-up
            sync(device)
            t0 = time.perf_counter()
            for i in range(0, len(jpegs), args.batch):
                decode_jpegs_on(jpegs[i:i + args.batch], device)
            sync(device)
            add(("decode", "nvjpeg, batched", rate(len(jpegs), time.perf_counter() - t0),
                         f"{len(jpegs)}/{len(datas)} files nvjpeg-safe"))
        old = FaceDetector(device)
        k = min(args.old_n, len(images))  # the per-image paths of before run on the first k images
        t0 = time.perf_counter()
        ref = [old(img) for img in images[:k]]
        sync(device)
        add(("detect", "per image, full resolution", rate(k, time.perf_counter() - t0),
                     f"missed {sum(r is None for r in ref) / k:.1%} of the first {k}"))
        chw = [torch.from_numpy(np.array(img)).permute(2, 0, 1).to(device) for img in images]

        def detect_all(size, smallest=SMALLEST_FACE):  # (hit or None per image, images/s) of the batched detector
            d = BatchDetector(device, detect_size=size, smallest_face=smallest)
            t0 = time.perf_counter()
            out = []
            for i in range(0, len(chw), args.batch):
                out += [h if isinstance(h, tuple) else None for h in d(chw[i:i + args.batch])]
            sync(device)
            return out, rate(len(chw), time.perf_counter() - t0)

        def versus(ref, other):  # share found/missed alike, and how far the landmarks of faces found by both moved
            same = sum((a is None) == (b is None) for a, b in zip(ref, other)) / len(ref)
            moved = [landmark_shift(a[0], b[0]) for a, b in zip(ref, other) if a is not None and b is not None]
            return same, (f"landmarks moved by {np.median(moved or [0]):.1%} (median), {max(moved or [0]):.1%} "
                          f"(max) of the eye distance")

        det = BatchDetector(device)
        det(chw[:args.batch])  # first calls (cuDNN's choices, allocations) out of the times compared below
        hits, r = detect_all(det.detect_size)
        agree, moved = versus(ref, hits)
        add(("detect", f"batched, longer side <= {det.detect_size}", r,
             f"missed {sum(h is None for h in hits) / len(hits):.1%}; same found/missed as per image for "
             f"{agree:.1%} of the first {k}, {moved}"))
        for size in [int(x) for x in args.detect_sizes.split(",") if x.strip()]:
            seen, r = detect_all(size)
            same, moved = versus(hits, seen)
            add(("detect", f"batched, longer side <= {size}", r,
                 f"missed {sum(h is None for h in seen) / len(seen):.1%}; same found/missed as at "
                 f"{det.detect_size} for {same:.1%}; {moved}"))
        for smallest in [int(x) for x in args.smallest_faces.split(",") if x.strip()]:
            seen, r = detect_all(det.detect_size, smallest)
            same, moved = versus(hits, seen)
            add(("detect", f"batched, <= {det.detect_size}, faces >= {smallest} px", r,
                 f"missed {sum(h is None for h in seen) / len(seen):.1%}; same found/missed as every level for "
                 f"{same:.1%}; {moved}"))
        if args.profile_detect:
            profile_detect(det, chw[:args.batch], device)
        found = [i for i, h in enumerate(hits) if h is not None]
        mats = np.array([hits[i][0] for i in found])
        t0 = time.perf_counter()
        for i in found[:k]:
            warp(images[i], hits[i][0])
        add(("align", "cv2, per image", rate(len(found[:k]), time.perf_counter() - t0), ""))
        t0 = time.perf_counter()
        crops = torch.cat([warp_batch([chw[j] for j in found[i:i + args.batch]], mats[i:i + args.batch])
                           for i in range(0, len(found), args.batch)])
        sync(device)
        add(("align", "warp_batch" + (" (grid_sample)" if device.type == "cuda" else " (cv2 on the CPU)"),
                     rate(len(found), time.perf_counter() - t0), ""))
        for t in teachers:
            t(crops[: args.batch])  # warm-up
            sync(device)
            t0 = time.perf_counter()
            for i in range(0, len(crops), args.batch):
                t(crops[i:i + args.batch])
            sync(device)
            add((f"teacher {t.name}", "batched", rate(len(crops), time.perf_counter() - t0), ""))

        # ---- the per-image path of before, end to end
        t0 = time.perf_counter()
        batch = []
        for n in names[:k]:
            img = decode_image(read_bytes(folder / n))
            hit = old(img)
            if hit is not None:
                batch.append(torch.from_numpy(warp(img, hit[0])).permute(2, 0, 1))
            if len(batch) == args.batch or (n == names[k - 1] and batch):
                x = torch.stack(batch).to(device)
                for t in teachers:
                    t(x)
                batch = []
        sync(device)
        old_rate = rate(k, time.perf_counter() - t0)
        add(("extraction end to end", "per image (before the engine)", old_rate,
                     f"first {k} images; {PAPER_FACES / old_rate / 3600:.1f} h for 4.12 M images"))

        # ---- the engine end to end (the write stage timed inside)
        cache = FeatureCache.create_or_resume(work / "cache", folder, names, teachers, shard_size=max(args.n, 1),
                                              dtype="float16", crop_size=CROP_SIZE)
        stages = Stages(device)
        opts = Options(batch=args.batch, workers=args.workers)
        with GpuUtil(device) as util:
            t0 = time.perf_counter()
            extract(cache, teachers, device, opts, timer=stages)
            new_rate = rate(len(names), time.perf_counter() - t0)
        cache.finalize()
        faces = int(FeatureCache(work / "cache").found.sum())
        face_rate = new_rate * faces / max(len(names), 1)
        for name in stages.seconds:  # inside the engine run, each stage synchronised (so a little slower)
            if not stages.items[name]:  # (decoding on the CPU: done by the loader's workers, not the engine)
                add((name, "in the loader, not timed here", "not measured", ""))
                continue
            what = "host copy + wait for the background write" if name == "write" else "inside the engine"
            add((name, what, rate(stages.items[name], stages.seconds[name]),
                 f"{stages.seconds[name]:.2f} s of {len(names) / new_rate:.2f} s"))
        add(("extraction end to end", f"engine, {args.workers} workers", new_rate,
                     f"{face_rate:,.0f} faces/s ({faces / len(names):.0%} of images hold one): "
                     f"{PAPER_FACES / face_rate / 3600:.1f} h for 4.12 M faces; {new_rate / old_rate:.2f}x before; "
                     f"GPU {util.text()}"))
        first = None
        for streams in [int(x) for x in args.streams.split(",") if x.strip()]:
            # without the per-stage synchronisation, which would serialise the lanes
            lane_cache = FeatureCache.create_or_resume(work / f"cache-{streams}", folder, names, teachers,
                                                       shard_size=max(args.n, 1), dtype="float16", crop_size=CROP_SIZE)
            with GpuUtil(device) as util:
                t0 = time.perf_counter()
                extract(lane_cache, teachers, device, Options(batch=args.batch, workers=args.workers, streams=streams))
                r = rate(len(names), time.perf_counter() - t0)
            first = first or r
            add(("extraction end to end", f"engine, {args.workers} workers, {streams} streams, not timed per stage",
                 r, f"{r * faces / max(len(names), 1):,.0f} faces/s; {r / first:.2f}x {args.streams.split(',')[0]} "
                    f"streams; GPU {util.text()}"))
            shutil.rmtree(work / f"cache-{streams}", ignore_errors=True)

        # ---- distillation: crop store + device augmentation vs the old loader, against train_step alone
        cache = FeatureCache(work / "cache")
        train = np.flatnonzero(cache.found)
        alone = train_rate(cache, train, args, device, "synthetic", args.steps)
        new_epoch = train_rate(cache, train, args, device, "store", args.steps)
        old_epoch = train_rate(cache, train, args, device, "images", args.old_steps)
        task_epoch = train_rate(cache, train, args, device, "task", args.steps)
        add(("distill", "train_step alone (synthetic batches on the device)", alone[0], f"GPU {alone[1]}"))
        add(("distill", "decode + warp + v2 per sample (before)", old_epoch[0],
                     f"{PAPER_FACES * PAPER_EPOCHS / old_epoch[0] / 3600:.1f} h for 40 epochs of 4.12 M"))
        add(("distill", "crop store + device augmentation", new_epoch[0],
                     f"{PAPER_FACES * PAPER_EPOCHS / new_epoch[0] / 3600:.1f} h for 40 epochs of 4.12 M; "
                     f"{new_epoch[0] / old_epoch[0]:.2f}x before; {new_epoch[0] / alone[0]:.0%} of train_step "
                     f"alone; GPU {new_epoch[1]}; the host waited for batches {new_epoch[2]:.0%} of the time"))
        add(("transfer", "task crop store + device augmentation (transfer.py's loader)", task_epoch[0],
             f"{task_epoch[0] / alone[0]:.0%} of train_step alone; GPU {task_epoch[1]}; the host waited for "
             f"batches {task_epoch[2]:.0%} of the time"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    head = (f"{args.n} images, teachers {args.teachers}, batch {args.batch}, {args.workers} workers, {device} "
            f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}, "
            f"{torch.get_num_threads()} threads), torch {torch.__version__}")
    table = tabulate([(s, p, f"{r:,.1f}" if isinstance(r, (int, float)) else r, note) for s, p, r, note in rows],
                     headers=["stage", "path", "per second", "note"], tablefmt="github")
    print(head + "\n\n" + table)
    if args.out:
        args.out.write_text(head + "\n\n" + table + "\n")


def train_rate(cache, rows, args, device, source: str, steps: int):
    """(images/s over `steps` training steps after --warmup untimed ones, GPU utilisation) with distill.py's
    train_step, the batches coming from the crop store ("store"), from decoding the images as the loader
    before the store did ("images"), from transfer.py's fine-tuning loader ("task"), or one fixed batch already
    on the device ("synthetic"). The rows are repeated to fill the steps, so a small folder still times a
    steady state."""
    import distill
    from kernels import cosine_distill_loss

    torch.manual_seed(0)
    student = build_student(out_dim=cache.dim).to(device)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    loss_fn = lambda out, t: cosine_distill_loss(out, t)
    rows = np.resize(rows, max(len(rows), (args.warmup + steps) * args.batch))
    loader = lambda data, **kw: torch.utils.data.DataLoader(data, batch_size=args.batch, num_workers=args.workers,
                                                            drop_last=True, **kw)
    if source == "store":
        data = AlignedFaces(cache, rows, train=True, targets=cache.features)
        dl = loader(data, sampler=EpochSampler(data, 0), collate_fn=first, pin_memory=device.type == "cuda")
        batches = ((to_device_pixels(b, args.size, device, True), b["target"]) for b in dl)
    elif source == "task":  # transfer.py's fine-tuning loader over the same crop store, feeding the same step
        import transfer
        from types import SimpleNamespace

        targets = torch.from_numpy(cache.features.take(np.arange(len(cache.images))).astype(np.float32))
        batches = transfer.face_batches(cache, rows, targets, args.size, True,
                                        SimpleNamespace(workers=args.workers, batch=args.batch, seed=0), device)()
    elif source == "images":
        batches = iter(loader(OldFaces(cache, rows, args.size), shuffle=True))
    else:
        x = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8, device=device)
        t = torch.randn(args.batch, cache.dim, device=device)
        batches = ((x, t) for _ in range(args.warmup + steps))
    util, n, clock = GpuUtil(device), 0, {"wait": 0.0}
    for i, (pixels, target) in enumerate(waited_for(batches, clock)):
        if i == args.warmup:
            sync(device)
            util.__enter__()
            t0, clock["wait"] = time.perf_counter(), 0.0
        loss = distill.train_step(student, pixels, target, loss_fn, opt)
        n += len(pixels) if i >= args.warmup else 0
        if i + 1 == args.warmup + steps:
            break
    loss.item()
    seconds = time.perf_counter() - t0
    util.__exit__()
    return rate(n, seconds), util.text(), clock["wait"] / max(seconds, 1e-9)


def waited_for(batches, clock):
    """batches, adding to clock["wait"] the time the host spends waiting for each: where the loader is what
    holds training back, this is most of the time (the device's queued work runs meanwhile)."""
    it = iter(batches)
    while True:
        t = time.perf_counter()
        try:
            b = next(it)
        except StopIteration:
            return
        clock["wait"] += time.perf_counter() - t
        yield b


class OldFaces(torch.utils.data.Dataset):
    """The loader before the crop store: decode the image, warp it, torchvision v2 augmentations."""

    def __init__(self, cache, rows, size):
        from torchvision.transforms import v2

        self.cache, self.rows = cache, rows
        self.transform = v2.Compose([
            v2.RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True),
            v2.RandomHorizontalFlip(), v2.RandomRotation(10),
            v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.2), v2.RandomGrayscale(0.05)])
        self.features = cache.features

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = int(self.rows[i])
        img = decode_image(read_bytes(self.cache.data_root / self.cache.images[row]))
        crop = torch.from_numpy(warp(img, self.cache.matrices[row], CANON)).permute(2, 0, 1)
        return self.transform(crop).contiguous(), torch.from_numpy(self.features.take([row])[0].astype(np.float32))


if __name__ == "__main__":
    main()

"""The extraction engine: image files -> aligned canonical crops -> every teacher's h_i, batch by batch.

One engine for fuse.py (the unlabelled corpus), transfer.py (a task's faces) and `distill.py embed`.
Loader workers only read bytes and decode: with PIL on the CPU path; on CUDA they pass plain JPEGs on
as bytes, which the main process decodes in one nvjpeg call per batch (anything else still goes
through PIL in the worker, with every bad-input rule). Detection (MTCNN on the whole batch, on a
downscaled copy), the similarity warps, the teachers and the crop-store shrink then run on the run's
device, and the teachers' outputs land, cast, straight in the shard's staging buffer there (one
fuse_features launch per batch); a shard goes back to the host once, and a background thread writes
it while the next shard fills. With streams > 1, several batches are in flight at once (Lanes).
"""
from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
from collections import defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kernels import fuse_features

from .align import (CANON, DETECT_SIZE, MIN_FACE_PROB, SMALLEST_FACE, BatchDetector, center_matrix, store_crops,
                    warp_batch)
from .cache import NON_FINITE, as_planned, open_npz
from .images import BadImage, csv_row_path, decode_image, decode_jpegs_on, nvjpeg_safe, read_bytes, read_image
from .precision import no_tf32
from .progress import Progress
from .runs import leave_stops_to_the_parent

log = logging.getLogger(__name__)


@dataclass
class Options:
    align: str = "mtcnn"          # mtcnn: detect and align; none: the images already are face crops
    min_face_prob: float = MIN_FACE_PROB
    batch: int = 32               # images per batch (detection, warp, teachers)
    workers: int | None = None    # loader processes reading and decoding; None: default_workers(device)
    detect_size: int = DETECT_SIZE  # longer side of the copy MTCNN sees
    smallest_face: int = SMALLEST_FACE  # pixels of that copy; MTCNN's levels for smaller faces are skipped
    streams: int = 0              # batches in flight at once (Lanes); 0: 2 on the CPU, 1 on a GPU or when timed

    def loader_workers(self, device) -> int:
        return default_workers(device) if self.workers is None else self.workers


DETECTOR_FLAGS = ("detect_size", "min_face_prob", "smallest_face")  # the settings only --align mtcnn reads


def detection_problem(align: str, detect_size: int, smallest_face: int) -> str | None:
    """Why these detector settings cannot run (a line for the user), or None."""
    if detect_size < SMALLEST_FACE:
        return (f"--detect-size {detect_size}: the detection copy needs {SMALLEST_FACE} pixels or more, MTCNN's "
                f"smallest face")
    if align == "mtcnn" and not SMALLEST_FACE <= smallest_face <= detect_size:
        # under 20 MTCNN has no level to add; over the copy's size nothing is left to search
        return (f"--smallest-face {smallest_face} must be between {SMALLEST_FACE} (every level searched) and "
                f"--detect-size ({detect_size}), in pixels of the detection copy")
    if align == "none" and smallest_face != SMALLEST_FACE:
        return "--smallest-face is for the detector, which --align none does not run"
    return None


class KnownFaces:
    """The detections of a finished cache of the same files and detector settings, reused instead of detecting
    again (detection bounds extraction): the same float32 matrices give the same crops, so the new cache's
    faces are those of the old one. The same files are the same names, sizes and modification times (the
    list hash); a row whose bytes still differ from those the old cache saw (sha1) is detected anew."""

    # Everything that decides which face a row gets, and where: equal in both plans, or nothing is reused.
    SAME = ("format", "detector", "data_root", "n_images", "list_hash", "align", "min_face_prob", "detect_size",
            "smallest_face", "boxes")

    def __init__(self, cache):
        self.cache, self.shards, self.lock = cache, {}, threading.Lock()

    @classmethod
    def differences(cls, plan: dict, other: dict) -> list[str]:
        """Why a cache with manifest `other` did not find the faces a cache planned as `plan` would (empty: it
        did): unfinished, or another image list, folder or detector setting."""
        plan, other = as_planned(plan), as_planned(other)
        why = [] if other.get("complete") is True else ["it is not finished"]
        for k in cls.SAME:
            mine, theirs = plan.get(k), other.get(k)
            if mine != theirs:
                why.append(f"its faces come from another version of the detection code ({theirs}, now {mine})"
                           if k == "detector" else "it was made from other files (names, sizes or times)"
                           if k == "list_hash" else f"{k} {theirs} != {mine}")
        return why

    @classmethod
    def matches(cls, plan: dict, other: dict) -> bool:
        """Whether a cache with manifest `other` found the faces a cache planned as `plan` would find."""
        return not cls.differences(plan, other)

    def _shard(self, k: int) -> dict:
        with self.lock:  # lanes ask from several threads
            if k not in self.shards:
                if len(self.shards) >= 4:  # rows are asked in order: the oldest shard is done with
                    self.shards.pop(next(iter(self.shards)))
                with open_npz(self.cache.meta_file(k), self.cache.redo_hint) as m:
                    self.shards[k] = {key: m[key] for key in ("found", "matrix", "score", "sha1", "reason")}
            return self.shards[k]

    def rows(self, rows) -> list[tuple]:
        """(sha1, found, matrix, score, reason) of each row in the old cache."""
        bounds = self.cache.bounds
        out = []
        for r in rows:
            k = int(np.searchsorted(bounds, r, side="right") - 1)
            m, j = self._shard(k), int(r - bounds[k])
            out.append((m["sha1"][j].decode(), bool(m["found"][j]), m["matrix"][j], float(m["score"][j]),
                        str(m["reason"][j])))
        return out


class Stages:
    """Seconds and items per pipeline stage (bench/pipeline.py); on CUDA each stage is synchronised,
    so only pass one when measuring."""

    def __init__(self, device=None):
        self.seconds, self.items = defaultdict(float), defaultdict(int)
        self.cuda = device is not None and torch.device(device).type == "cuda"

    @contextmanager
    def __call__(self, name, n):
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds[name] += time.perf_counter() - t0
        self.items[name] += n


@contextmanager
def _untimed(name, n):
    yield


class ImageFiles(torch.utils.data.Dataset):
    """Read (and, unless the GPU will, decode) one image; a bad file becomes a row with its reason."""

    def __init__(self, root: Path, images: list[str], reader=None, gpu_jpeg: bool = False):
        self.root, self.images, self.reader, self.gpu_jpeg = Path(root), images, reader, gpu_jpeg

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        path = self.root / self.images[i]
        item = {"image": None, "jpeg": None, "sha1": "", "reason": ""}
        try:
            if self.reader is not None:
                item["image"] = _chw(self.reader(path))
                return item
            if csv_row_path(path):  # a face stored as pixels in a CSV (FER2013) has no bytes of its own
                img, item["sha1"] = read_image(path, with_hash=True)
                item["image"] = _chw(img)
                return item
            data = read_bytes(path)
            item["sha1"] = hashlib.sha1(data).hexdigest()
            if self.gpu_jpeg and nvjpeg_safe(data):
                item["jpeg"], item["path"] = data, str(path)
            else:
                item["image"] = _chw(decode_image(data, path))
        except BadImage as e:
            item["reason"] = str(e)
        return item


def _chw(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.require(arr, np.uint8, ["C", "W"])).permute(2, 0, 1)


def _crop_buffer(n, size, device):
    """Zeroed (n, 3, size, size) uint8 crops; channels-last on the CPU, where cv2 warps and the store is
    (n, size, size, 3), so no uint8 transpose is ever copied there."""
    if torch.device(device).type == "cpu":  # made channels-last: zeroing then converting filled two 201 MB shards
        return torch.zeros(n, size, size, 3, dtype=torch.uint8).permute(0, 3, 1, 2)
    return torch.zeros(n, 3, size, size, dtype=torch.uint8, device=device)


def _as_list(batch):
    return batch


def default_workers(device) -> int:
    """Loader processes when none are asked for. On the CPU none: the teachers keep every core busy and
    decoding in the main thread is what BENCHMARKS.md's CPU rows measured. On a GPU the host only reads and
    decodes, so all but two of the cores this process may use (the main thread dispatching the device's
    work, the shard writer), split between the processes torchrun starts on the machine, at most 12: the
    H100 measurement's 12 of 16 cores."""
    if torch.device(device).type == "cpu":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_process = cores // max(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), 1)
    return max(0, min(12, per_process - 2))


def loader(root, images, opts: Options, device, reader=None, batches=None):
    """Loader items of `images` in `batches` (lists of indices; default: runs of opts.batch in order)."""
    gpu = torch.device(device).type == "cuda"
    files = ImageFiles(root, images, reader, gpu_jpeg=gpu)
    if batches is None:
        batches = _chunks(0, len(images), opts.batch)
    workers = opts.loader_workers(device)
    return torch.utils.data.DataLoader(files, batch_sampler=batches, num_workers=workers, collate_fn=_as_list,
                                       prefetch_factor=4 if workers else None, worker_init_fn=leave_stops_to_the_parent)


def _chunks(lo, hi, size):
    return [range(i, min(i + size, hi)) for i in range(lo, hi, size)]  # ranges: 4 M indices as lists were 173 MB


class Engine:
    """Decode -> detect -> align -> teachers for one batch of loader items, on `device`."""

    def __init__(self, teachers, device, opts: Options, timer=None, known: KnownFaces | None = None, boxes=None):
        """boxes: a dataset's face box per cache row (NaN: none), searched around instead of the whole image."""
        self.teachers, self.device, self.opts, self.known = teachers, torch.device(device), opts, known
        self.boxes = boxes
        self.timer = timer or _untimed
        # Batches in other lanes may call the teachers at the same time: a runtime such as LiteRT keeps
        # per-call state in its interpreter, so each teacher runs one batch at a time.
        self.locks = [threading.Lock() for _ in teachers]
        # The features are stored raw (mean 0 / std 1: the corpus statistics are only known once every shard
        # is written). Made here, on the main stream, which each lane's stream waits for: a tensor made
        # lazily in one lane could be read by another lane's stream before its fill kernel ran.
        d = sum(t.dim for t in teachers)
        self._identity = (torch.zeros(d, device=self.device), torch.ones(d, device=self.device))
        self.detector = (BatchDetector(self.device, opts.min_face_prob, detect_size=opts.detect_size,
                                       smallest_face=opts.smallest_face)
                         if opts.align == "mtcnn" else None)

    def decode(self, items, reasons) -> list:
        """(3, H, W) uint8 images on the device (None for bad rows, their reasons set); nvjpeg for the JPEGs
        the workers passed on."""
        with self.timer("decode", sum(1 for it in items if it["jpeg"] is not None)):
            jpeg = [i for i, it in enumerate(items) if it["jpeg"] is not None]
            try:
                decoded = decode_jpegs_on([items[i]["jpeg"] for i in jpeg], self.device) if jpeg else []
            except torch.cuda.OutOfMemoryError:
                raise  # the device's own trouble, not the files': decoding them on the host would hide it
            except RuntimeError as e:  # nvjpeg fails its whole batch for one stream it refuses (a damaged
                # file passes its header check): the batch is decoded on the host, as the CPU path would
                log.warning(f"nvjpeg refused a batch of {len(jpeg)} JPEGs ({str(e)[:200]}): decoded by PIL instead")
                decoded = [self._decode_on_host(items[i], reasons, i) for i in jpeg]
        images = [None if it["image"] is None else it["image"].to(self.device, non_blocking=True) for it in items]
        for i, img in zip(jpeg, decoded):
            images[i] = img
        return images

    def _decode_on_host(self, item, reasons, i):
        """PIL's pixels, or its reason for refusing the file: what the CPU path gives the same bytes."""
        try:
            return _chw(decode_image(item["jpeg"], item["path"])).to(self.device)
        except BadImage as e:
            reasons[i] = str(e)
            return None

    def align(self, images, reasons, sha1s=None, rows=None):
        """Canonical crops (N, 3, CANON, CANON) uint8 on the device (black where no face), matrices, scores."""
        n = len(images)
        matrices, scores = np.zeros((n, 2, 3)), np.zeros(n)
        ok = [i for i in range(n) if images[i] is not None]
        hit_of = {}
        if self.known is not None and rows is not None:  # the old cache's answer, where it saw the same bytes
            for i, (sha1, was_found, matrix, score, reason) in zip(ok, self.known.rows([rows[i] for i in ok])):
                if sha1 == sha1s[i]:  # a face its teachers failed on was still found by its detector
                    face = was_found or NON_FINITE in reason
                    hit_of[i] = (matrix.astype(np.float64), score) if face else (reason or None)
        todo = [i for i in ok if i not in hit_of]
        with self.timer("detect", len(todo)):
            if self.detector is None:
                hits = [(center_matrix(images[i].shape[2], images[i].shape[1]), 1.0) for i in todo]
            else:
                boxes = None if self.boxes is None or rows is None else [self.boxes[rows[i]] for i in todo]
                hits = self.detector([images[i] for i in todo], boxes) if todo else []
        hit_of.update(zip(todo, hits))
        found = []
        for i, hit in ((i, hit_of[i]) for i in ok):
            if isinstance(hit, str):  # too small to search: a counted row, like a bad file
                reasons[i] = hit
            elif hit is None:
                reasons[i] = "no face detected"
            else:
                matrices[i], scores[i] = hit
                found.append(i)
        # Warp with the matrices as the cache stores them (float32), so they give back these exact crops.
        matrices = matrices.astype(np.float32).astype(np.float64)
        crops = _crop_buffer(n, CANON, self.device)
        with self.timer("align", len(found)):
            if found:
                crops[found] = warp_batch([images[i] for i in found], matrices[found])
        return crops, matrices, scores, np.array([not r for r in reasons], bool)

    def features(self, crops, found, out):
        """Every teacher on the batch's crops, written cast into `out` (a slice of the shard's staging buffer)
        in one launch. Crops without a face are run too (they are black) so that the slice stays contiguous;
        their rows are zeroed after."""
        outs = []
        for t, lock in zip(self.teachers, self.locks):
            with self.timer(f"teacher {t.name}", len(crops)), lock:
                outs.append(t(crops).to(self.device))
        fuse_features(outs, *self._identity, out=out)  # placed and cast, not standardised
        if not found.all():  # a mask, not boolean indexing, which would make the host wait for the device
            out.masked_fill_(torch.from_numpy(~found).to(out.device, non_blocking=True)[:, None], 0)

    def run_batch(self, items, rows=None):
        """(canonical crops, matrices, scores, found, sha1s, reasons) of one loader batch (of these cache rows)."""
        reasons, sha1s = [it["reason"] for it in items], [it["sha1"] for it in items]
        images = self.decode(items, reasons)
        crops, matrices, scores, found = self.align(images, reasons, sha1s, rows)
        return crops, matrices, scores, found, sha1s, reasons

    def fill(self, items, feats, crops_out, crop_size: int, rows=None):
        """One batch into its rows of a shard's buffers (feats and crops_out are those rows): every
        teacher's h_i and the store's crops. Returns the rows' (found, matrices, scores, sha1s, reasons)."""
        crops, matrices, scores, found, sha1, reasons = self.run_batch(items, rows)
        if self.teachers and found.any():
            with torch.inference_mode():
                self.features(crops, found, feats)
        if crop_size:
            crops_out[:] = store_crops(crops, crop_size)
        return found, matrices, scores, sha1, reasons


class Lanes:
    """Up to n batches in flight at once, each on a host thread and, on a GPU, a CUDA stream of its own.

    MTCNN on a batch dispatches thousands of small ops and reads values back a few dozen times, and while
    one thread does that the GPU idles. With lanes, one batch's host work overlaps another's kernels.
    PyTorch releases the GIL while it dispatches an op, so the threads' host work overlaps too (measured
    on the CPU: two threads of detection on small images ran 1.9x one). n=1: in the calling thread, on
    its current stream, as without lanes. Results come back in submission order (Future per batch)."""

    def __init__(self, n: int, device):
        self.n, device = max(1, int(n)), torch.device(device)
        self.cuda = device.type == "cuda" and self.n > 1
        self.pool = ThreadPoolExecutor(self.n, thread_name_prefix="lane") if self.n > 1 else None
        self.main = torch.cuda.current_stream(device) if self.cuda else None
        self.streams = queue.SimpleQueue()  # a stream per thread: no two batches share one
        for _ in range(self.n):
            self.streams.put(torch.cuda.Stream(device) if self.cuda else None)

    def mark(self):
        """An event on the main stream after all it has queued so far (say, a shard's zeroed buffers), for
        submit's `after`; None off a GPU or with one lane (then everything runs on the main stream)."""
        if not self.cuda:
            return None
        ready = torch.cuda.Event()
        ready.record(self.main)
        return ready

    def submit(self, fn, *args, after=None) -> Future:
        """fn(*args) in a lane, its stream first waiting for the event `after` (from mark): a Future of (its
        result, a CUDA event recorded after its work, or None)."""
        if self.pool is None:
            done = Future()
            done.set_result((fn(*args), None))
            return done
        return self.pool.submit(self._run, fn, args, after)

    def _run(self, fn, args, after):
        stream = self.streams.get()
        try:
            if stream is None:
                return fn(*args), None
            # That event, not the whole main stream: the main stream also waits for the lanes before it
            # copies a shard, and waiting for all of it would drain every lane at each shard's end.
            if after is not None:
                stream.wait_event(after)
            with torch.cuda.stream(stream):
                out = fn(*args)
                done = torch.cuda.Event()
                done.record(stream)
            return out, done
        finally:
            self.streams.put(stream)

    def join(self, events) -> None:
        """Make the main stream wait for these batches' work (before it reads what they wrote)."""
        for e in events:
            if e is not None:
                self.main.wait_event(e)

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        if self.cuda:  # after a failure, kernels still queued must not write into buffers about to be freed
            torch.cuda.synchronize(self.main.device)


def extract(cache, teachers, device, opts: Options, rank=0, world=1, log=None, reader=None, timer=None,
            faces_from=None) -> None:
    """Fill this rank's unfinished shards of `cache` (shard k belongs to rank k % world): features of every
    teacher, the crop store, and per-row found / matrix / score / sha1 / reason. With no teachers, only
    the faces and their crops are stored. faces_from: a finished cache of the same files and detector
    settings (KnownFaces.matches) whose detections are taken instead of detecting again.

    One loader runs over all these shards, so its workers and their prefetched batches live on across shard
    boundaries; a finished shard is copied to the host and written by a background thread while the next
    one fills (at most one write in flight). opts.streams batches are in flight at once (Lanes); a timer,
    which synchronises every stage, needs one."""
    device = torch.device(device)
    mine = [k for k in range(cache.n_shards) if k % world == rank]
    todo = [k for k in mine if not cache.shard_done(k)]
    rows_of = lambda k: int(cache.bounds[k + 1] - cache.bounds[k])
    total = sum(rows_of(k) for k in mine)
    of_rank = f" of rank {rank}" if world > 1 else ""
    if log and len(todo) < len(mine):
        log.info(f"resuming: {len(mine) - len(todo)} of the {len(mine)} shards{of_rank} already in {cache.path}")
    if not todo:
        return  # before the loader: no workers are started for nothing
    if timer is not None and opts.streams > 1:
        raise ValueError("per-stage timing synchronises the device at every stage: run it with streams=1")
    # 2 on the CPU: 1.12x one on 2 cores (BENCHMARKS.md); on a GPU more is not yet measured
    streams = opts.streams or (2 if device.type == "cpu" and timer is None else 1)
    if log:
        log.info(f"extracting on {device}{' the shards' + of_rank if world > 1 else ''}: batches of {opts.batch}, "
                 f"{streams} in flight, {opts.loader_workers(device)} loader workers")
    known = None
    if faces_from is not None:
        if not KnownFaces.matches(cache.manifest, faces_from.manifest):
            raise ValueError(f"{faces_from.path} is not a finished cache of the same files and detector settings "
                             f"as {cache.path}: its faces cannot be reused")
        known = KnownFaces(faces_from)
        if log:
            log.info(f"faces (detections and alignment) taken from {faces_from.path}: no detection")
    engine = Engine(teachers, device, opts, timer, known, cache.boxes)
    timer = engine.timer
    dtype = getattr(torch, cache.manifest["dtype"])
    s = cache.crop_size
    # Batches never straddle a shard, so each one fills a slice of a single shard's staging buffers.
    plan = [(k, b) for k in todo for b in _chunks(int(cache.bounds[k]), int(cache.bounds[k + 1]), opts.batch)]
    batches = loader(cache.data_root, cache.images, opts, device, reader, [b for _, b in plan])
    bar = Progress(f"extract[{rank}]", total=total, initial=total - sum(rows_of(k) for k in todo), leave=True)
    last = [time.perf_counter()]

    def write(k, feats, crops, meta, done):
        drop_non_finite(feats, meta, cache.slices(), cache.manifest["dtype"])
        cache.write_shard(k, feats, crops=crops, **meta)
        if log:  # a log line per shard too: the bar is hidden when output goes to a file
            # Time since the previous shard was written: with writes overlapped, that is the run's rate.
            now = time.perf_counter()
            log.info(f"shard {k} written ({done}/{len(todo)} of this run, rank {rank}): "
                     f"{rows_of(k) / (now - last[0]):.1f} img/s")
            last[0] = now

    shards = {}  # shard -> its buffers, meta, rows still to fill and its batches' lane events
    written, pending, flight = 0, None, deque()

    def take():
        """The oldest batch in flight: its rows' meta; its shard written once that was its last batch."""
        k, n, fut = flight.popleft()
        (found, matrices, scores, sha1, reasons), done = fut.result()
        sh = shards[k]
        for key, value in zip(sh["meta"], (found, matrices, scores, sha1, reasons)):
            sh["meta"][key].extend(list(value))
        sh["events"].append(done)
        sh["left"] -= n
        bar.update(n)
        if not sh["left"]:
            flush(k)

    def flush(k):
        nonlocal written, pending
        sh = shards.pop(k)
        with timer("write", rows_of(k)):  # what the write still costs this thread
            lanes.join(sh["events"])
            # The device-to-host copy stays here, in the main stream's order, after the lanes' work.
            crops_np = sh["crops"].permute(0, 2, 3, 1).cpu().numpy() if s else None
            feats_np = sh["feats"].cpu().numpy()
            prev, pending = pending, None
            if prev is not None:
                prev.result()  # one write in flight, in shard order; its failure is raised here
            written += 1
            pending = writer.submit(write, k, feats_np, crops_np, sh["meta"], written)

    lanes = Lanes(streams, device)
    # TF32 off for the whole run: the teachers turn it off around their calls (their embeddings must match
    # the other runtimes), and the flag is global, so one lane's teacher would flip it under another lane's
    # detection, whose results would then depend on timing. Off throughout, MTCNN runs in float32 on a GPU
    # as on the CPU, whatever the lanes.
    with ThreadPoolExecutor(max_workers=1) as writer, no_tf32():
        try:
            for (k, idx), items in zip(plan, batches, strict=True):  # a short loader is an error, not a gap
                if k not in shards:
                    lo, hi = int(cache.bounds[k]), int(cache.bounds[k + 1])
                    # New buffers per shard: on the CPU the host copy is a view of them, still being written.
                    shards[k] = {"lo": lo, "left": hi - lo, "events": [],
                                 "feats": torch.zeros(hi - lo, cache.dim, dtype=dtype, device=device),
                                 "crops": _crop_buffer(hi - lo, s, device) if s else None,
                                 "meta": {"found": [], "matrix": [], "score": [], "sha1": [], "reason": []},
                                 # after the buffers (and the teachers' and engine's tensors): lanes start there
                                 "ready": lanes.mark()}
                sh, n = shards[k], len(items)
                rows = slice(idx[0] - sh["lo"], idx[0] - sh["lo"] + n)
                flight.append((k, n, lanes.submit(engine.fill, items, sh["feats"][rows],
                                                  sh["crops"][rows] if s else None, s, idx, after=sh["ready"])))
                while len(flight) >= lanes.n or (flight and flight[0][2].done()):
                    take()
            while flight:
                take()
        finally:
            try:
                lanes.close()  # batches still in flight after a failure end before their buffers go
            finally:
                if pending is not None:  # also after a failure: the finished shard is kept, or its error raised
                    with timer("write", 0):
                        pending.result()
    bar.close()


def drop_non_finite(feats: np.ndarray, meta: dict, slices: dict, dtype: str) -> None:
    """A face on which a teacher gave inf or NaN (an activation past float16's range once stored, or a
    teacher's numeric failure on one crop) becomes a missed face whose reason names the teacher, its row
    zeroed: one such row would make every teacher statistic, and so G and h_G, NaN."""
    bad = np.flatnonzero(np.asarray(meta["found"], bool) & ~np.isfinite(feats).all(axis=1))
    for i in bad:
        names = [name for name, sl in slices.items() if not np.isfinite(feats[i, sl]).all()]
        hint = " (past float16's range of +-65,504? --dtype float32 stores it)" if dtype == "float16" else ""
        meta["found"][i] = False
        meta["reason"][i] = f"teacher {', '.join(names)} {NON_FINITE}{hint}"
        feats[i] = 0


def crops_of_files(paths, device, opts: Options, crop_size: int):
    """Store-size crops of image files (for `distill.py embed`): yields (indices, crops on device, reasons)
    per batch; reasons[i] is "" where a face was found."""
    engine = Engine([], device, opts)
    paths = [os.path.abspath(p) for p in paths]  # not resolve(): a symbolic-link loop is a listed row
    start = 0
    for items in loader("/", paths, opts, device):
        with no_tf32():  # detection as extract() runs it (not around the yield: the caller's code)
            crops, _, _, found, _, reasons = engine.run_batch(items)
        idx = np.arange(start, start + len(items))
        yield idx, store_crops(crops, crop_size), found, reasons
        start += len(items)

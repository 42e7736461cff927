"""Aligned face crops for training the student: the cache's crop store -> augmentation or resize on the
run's device, per batch -> uint8 pixels, with the cached target rows beside them.

Loader workers only gather rows of the memory-mapped crop store (no image is decoded again) and draw
each sample's augmentation parameters from a seed given with the sample, not from the worker's RNG;
the main process then applies the whole batch's augmentations on the device in one affine
grid_sample and a few elementwise ops. What a sample looks like therefore depends only on (run seed,
epoch, row): a resumed run, or one with another number of loader workers, sees exactly the same pixels.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch.nn import functional as F

# The evaluation view: the whole crop, resized (antialiased) to the student's input size.
from .align import store_crops as resize

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as torchvision's rgb_to_grayscale


# One row of augmentation parameters per sample (augment reads them in this order), from as many uniforms.
N_PARAMS = 10


def aug_params(u: np.ndarray) -> np.ndarray:
    """(n, N_PARAMS) float32 parameters from (n, N_PARAMS) uniforms in [0, 1). Mild on purpose: the target
    h_G was computed on the un-augmented crop, so strong changes would ask the student to map
    different-looking faces to one point. The canonical crop keeps a 10% margin around the ArcFace box,
    which the crop scale and rotation may eat into but not past. No hue jitter: skin hue shifts are not a
    variation face photos have."""
    u = np.asarray(u, np.float64)
    area = 0.8 + 0.2 * u[:, 0]
    ratio = np.exp(math.log(0.9) + (math.log(1.1) - math.log(0.9)) * u[:, 1])
    w, h = np.minimum(np.sqrt(area * ratio), 1.0), np.minimum(np.sqrt(area / ratio), 1.0)
    x0, y0 = u[:, 2] * (1 - w), u[:, 3] * (1 - h)
    flip, angle = u[:, 4] < 0.5, -10 + 20 * u[:, 5]
    bright, contrast, sat = 0.7 + 0.6 * u[:, 6], 0.7 + 0.6 * u[:, 7], 0.8 + 0.4 * u[:, 8]
    grey = u[:, 9] < 0.05
    return np.stack([x0 + w / 2, y0 + h / 2, w, h, flip, angle, bright, contrast, sat, grey], 1).astype(np.float32)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def sample_seeds(seed: int, epoch: int, rows) -> np.ndarray:
    """One augmentation seed per row, a hash of (seed, epoch, row), vectorised, so an epoch of 4 M faces
    costs milliseconds (a SeedSequence per sample cost ~13 us, ~53 s an epoch)."""
    mask = np.uint64(0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):
        z = (np.asarray(rows, np.uint64) * np.uint64(0x9E3779B97F4A7C15)
             + np.uint64((seed * 0x632BE59BD9B4E019 + epoch * 0x94D049BB133111EB) & int(mask)))
    return (_mix(z) >> np.uint64(1)).astype(np.int64)  # non-negative, as torch.manual_seed wants


def seed_uniforms(seeds, k: int = N_PARAMS) -> np.ndarray:
    """(n, k) uniforms in [0, 1), row i a function of seeds[i] alone (splitmix64 of the seed's stream),
    vectorised: a numpy Generator per sample cost ~100 us, about one loader core at 10,000 images/s."""
    with np.errstate(over="ignore"):
        z = (np.asarray(seeds, np.int64).astype(np.uint64)[:, None]
             + np.arange(1, k + 1, dtype=np.uint64)[None] * np.uint64(0x9E3779B97F4A7C15))
    return (_mix(z) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


@functools.lru_cache(maxsize=8)
def _luma(device, dtype):
    # made once: torch.tensor(..., device="cuda") is a blocking copy, a host wait in every training step
    return torch.tensor(_LUMA, dtype=dtype).view(1, 3, 1, 1).to(device)


def _grey(x):
    return (x * _luma(x.device, x.dtype)).sum(1, keepdim=True)


def augment(crops: torch.Tensor, params: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, S, S) uint8 crops and (B, N_PARAMS) parameters -> (B, 3, size, size) uint8, on the crops' device.

    Geometry in one grid_sample: a crop box (fraction of the side, centred at cx, cy), a horizontal flip,
    then a rotation of up to 10 degrees about the centre, black outside the crop. Then brightness,
    contrast (about each image's mean grey), saturation and, for a few, greyscale.
    """
    # non-blocking: a blocking copy waits for the whole stream, i.e. for the previous training step
    p = params.to(crops.device, torch.float32, non_blocking=True)
    cx, cy, w, h, flip, angle, bright, contrast, sat, grey = p.unbind(1)
    a = torch.deg2rad(angle)
    cos, sin = torch.cos(a), torch.sin(a)
    sx = torch.where(flip > 0.5, -w, w)
    # output (u, v) in [-1, 1] -> rotate -> flip -> box: source = box(flip(R u))
    theta = torch.stack([torch.stack([sx * cos, -sx * sin, 2 * cx - 1], 1),
                         torch.stack([h * sin, h * cos, 2 * cy - 1], 1)], 1)
    grid = F.affine_grid(theta, (len(crops), 3, size, size), align_corners=False)
    x = F.grid_sample(crops.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = (x * bright.view(-1, 1, 1, 1)).clamp(0, 255)
    m = _grey(x).mean((1, 2, 3), keepdim=True)
    x = ((x - m) * contrast.view(-1, 1, 1, 1) + m).clamp(0, 255)
    g = _grey(x)
    x = (g + (x - g) * sat.view(-1, 1, 1, 1)).clamp(0, 255)
    x = torch.where(grey.view(-1, 1, 1, 1) > 0.5, _grey(x).expand_as(x), x)
    return x.round_().to(torch.uint8)


def to_device_pixels(batch, size: int, device, train: bool) -> torch.Tensor:
    """A loader batch's crops -> the student's uint8 input on device (augmented when params are given)."""
    crops = batch["crops"].to(device, non_blocking=True)
    if train and batch.get("params") is not None:
        return augment(crops, batch["params"], size)
    return resize(crops, size)


class NoTargets:
    """targets for AlignedFaces when only the crops are wanted (embedding faces): nothing read per row."""

    def take(self, rows) -> np.ndarray:
        return np.zeros((len(rows), 0), np.float32)


class AlignedFaces(torch.utils.data.Dataset):
    """Crops of the given cache rows, from its crop store, with their target rows (h_G by default).

    targets: anything with .take(rows) -> (n, d) array (a ShardedArray of the cache), row-aligned with
    the cache (default: its first h_G). Fetched a batch at a time: a batch is {"crops": (B, 3, S, S) uint8,
    "target": (B, d) float32, "rows": (B,), "params": (B, N_PARAMS) or None}; use collate_fn=first with a DataLoader. Indices may be plain
    positions or (position, augmentation seed) pairs, as EpochSampler yields.
    """

    def __init__(self, cache, rows, train: bool, targets=None):
        self.rows, self.train = np.asarray(rows, np.int64), train
        if targets is None:
            targets = cache.embedding((cache.embedding_names() or ["ae"])[0])[0]
        self.targets, self.crops = targets, cache.crops

    def __len__(self):
        return len(self.rows)

    def __getitems__(self, keys):
        pos = [k[0] if isinstance(k, tuple) else k for k in keys]
        rows = self.rows[pos]
        crops = torch.from_numpy(np.ascontiguousarray(self.crops.take(rows))).permute(0, 3, 1, 2)
        params = None
        if self.train and keys and isinstance(keys[0], tuple):
            params = torch.from_numpy(aug_params(seed_uniforms([k[1] for k in keys])))
        target = torch.from_numpy(self.targets.take(rows).astype(np.float32))
        return {"crops": crops, "target": target, "rows": torch.from_numpy(rows), "params": params}

    def __getitem__(self, key):
        return self.__getitems__([key])


def first(batch):
    """collate_fn for datasets that fetch whole batches (__getitems__)."""
    return batch


class EpochSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler whose order is a function of (seed, epoch), that can start mid-epoch (resume),
    and that hands each index with its augmentation seed. Works for a single process too.

    An epoch is whole global batches (world x batch faces) of that order, rank r taking every world-th from
    r: step k of N processes trains on the faces of step k of one process with N times the batch, none twice
    (DistributedSampler's padding gave a face to two ranks, and an epoch another number of steps)."""

    def __init__(self, dataset, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True, batch: int = 1):
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.num_samples = len(dataset) // (world * batch) * batch
        self.total_size = self.num_samples * world
        self.skip = 0

    def set_position(self, epoch: int, skip: int = 0) -> None:
        """Start epoch `epoch` after its first `skip` samples of this rank."""
        self.set_epoch(epoch)
        self.skip = skip

    def __len__(self):
        return max(self.num_samples - self.skip, 0)

    def __iter__(self):
        positions = self._positions()[self.skip:]
        seeds = sample_seeds(self.seed, self.epoch, self.dataset.rows[positions])
        for s in range(0, len(positions), 65536):  # Python ints a chunk at a time: 4 M of them take ~300 MB
            yield from zip(positions[s:s + 65536].tolist(), seeds[s:s + 65536].tolist())

    def _positions(self) -> np.ndarray:
        """This rank's positions for the epoch, in DistributedSampler's order, kept in numpy."""
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).numpy()
        else:
            order = np.arange(n)
        return order[self.rank:self.total_size:self.num_replicas].astype(np.int64)


class Batches(torch.utils.data.Sampler):
    """Positions in batches, in the order of (seed, epoch) when shuffling (set_epoch, as DistributedSampler): a
    DataLoader with worker processes asks for its sampler's order twice per epoch, so a generator drawn at each
    ask gave another order than without workers. A last batch of one image joins the one before it: batch norm
    cannot train on a single image whose feature map has shrunk to one value."""

    def __init__(self, n: int, batch: int, shuffle: bool, seed: int):
        self.n, self.batch, self.shuffle, self.seed, self.epoch = n, batch, shuffle, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist() if self.shuffle \
            else list(range(self.n))
        chunks = [order[i:i + self.batch] for i in range(0, self.n, self.batch)]
        if len(chunks) > 1 and len(chunks[-1]) == 1:
            last = chunks.pop()
            chunks[-1] += last
        return iter(chunks)

    def __len__(self):
        return -(-self.n // self.batch) - (self.n > self.batch and self.n % self.batch == 1)

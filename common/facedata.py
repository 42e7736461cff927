"""Aligned face crops for training the student: image file -> canonical crop (from the cached matrix)
-> augmentation or resize -> uint8 tensor, with the cached target row beside it.

Augmentations are drawn from a seed given with each sample, not from the worker's RNG, so that what a
sample looks like depends only on (run seed, epoch, row): a resumed run, or one with another number of
loader workers, sees exactly the same pixels.
"""
from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms import v2

from common.align import CANON, warp
from common.images import read_image


def train_transform(size: int):
    # Mild on purpose: the target h_G was computed on the un-augmented crop, so strong changes would
    # ask the student to map different-looking faces to one point. The canonical crop keeps a 10%
    # margin around the ArcFace box, which the crop scale and rotation may eat into but not past.
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomRotation(10),
        # No hue jitter: on uint8 tensors it costs 6x the rest of the pipeline together, and skin hue
        # shifts are not a variation face photos have.
        v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.2),
        v2.RandomGrayscale(0.05),
    ])


def eval_transform(size: int):
    return v2.Resize((size, size), antialias=True)


def aligned_crop(image: np.ndarray, matrix: np.ndarray) -> torch.Tensor:
    """The CANON x CANON canonical crop as a 3 x CANON x CANON uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(warp(image, matrix, CANON))).permute(2, 0, 1)


def sample_seeds(seed: int, epoch: int, rows) -> np.ndarray:
    """One augmentation seed per row, a hash of (seed, epoch, row): splitmix64's finaliser, vectorised,
    so an epoch of 4 M faces costs milliseconds (a SeedSequence per sample cost ~13 us, ~53 s an epoch)."""
    mask = np.uint64(0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):
        z = (np.asarray(rows, np.uint64) * np.uint64(0x9E3779B97F4A7C15)
             + np.uint64((seed * 0x632BE59BD9B4E019 + epoch * 0x94D049BB133111EB) & int(mask)))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(1)).astype(np.int64)  # torch.manual_seed takes a non-negative int64



class AlignedFaces(torch.utils.data.Dataset):
    """Faces of the given cache rows, with their target rows (h_G by default).

    targets: anything with .take(rows) -> (n, d) array (a ShardedArray of the cache), row-aligned with
    the cache. An item is (uint8 3 x size x size pixels, float32 target, cache row). Indices may be
    plain positions or (position, augmentation seed) pairs, as EpochSampler yields.
    """

    def __init__(self, cache, rows, size: int, train: bool, targets=None, embedding: str | None = None):
        self.cache, self.rows, self.size, self.train = cache, np.asarray(rows, np.int64), size, train
        if targets is None:
            targets = cache.embedding(embedding or (cache.embedding_names() or ["ae"])[0])[0]
        self.targets = targets
        self.root, self.images, self.matrices = cache.data_root, cache.images, cache.matrices
        self.transform = train_transform(size) if train else eval_transform(size)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, key):
        pos, seed = key if isinstance(key, tuple) else (key, None)
        row = int(self.rows[pos])
        crop = aligned_crop(read_image(self.root / self.images[row]), self.matrices[row])
        if self.train and seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                pixels = self.transform(crop)
        else:
            pixels = self.transform(crop)
        target = torch.from_numpy(self.targets.take([row])[0].astype(np.float32))
        return pixels.contiguous(), target, row


class EpochSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler whose order is a function of (seed, epoch), that can start mid-epoch (resume),
    and that hands each index with its augmentation seed. Works for a single process too."""

    def __init__(self, dataset, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True):
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.skip = 0

    def set_position(self, epoch: int, skip: int = 0) -> None:
        """Start epoch `epoch` after its first `skip` samples of this rank."""
        self.set_epoch(epoch)
        self.skip = skip

    def __len__(self):
        return max(self.num_samples - self.skip, 0)

    def __iter__(self):
        positions = np.asarray(list(super().__iter__())[self.skip:], np.int64)
        seeds = sample_seeds(self.seed, self.epoch, self.dataset.rows[positions])
        yield from zip(positions.tolist(), seeds.tolist())

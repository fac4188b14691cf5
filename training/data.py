"""Image-folder checks, a seeded image-folder dataset and a resumable (distributed) sampler."""
from __future__ import annotations

import logging
import math
import os
import random
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

_logger = logging.getLogger("ddf.data")

IMG_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


class DatasetError(ValueError):
    """Raised for a missing/empty dataset folder; the message names the offending path."""


def scan_image_folder(root: str, split: str) -> Tuple[List[Tuple[str, int]], List[str]]:
    """Check ``<root>/<split>/<class>/<images>`` and return ``(samples, class_names)``.

    Raises :class:`DatasetError` naming the path when the root or split is missing, when there are no class
    folders, or when a class folder holds no images.
    """
    if not root:
        raise DatasetError("data root is empty: pass the dataset folder (containing train/ and val/)")
    if not os.path.isdir(root):
        raise DatasetError(f"data root not found: {os.path.abspath(root)} (expected a folder with train/ and val/)")
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise DatasetError(f"split folder not found: {os.path.abspath(split_dir)} "
                           f"(expected layout <root>/{split}/<class>/*.jpeg)")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DatasetError(f"no class folders in {os.path.abspath(split_dir)} "
                           f"(expected layout <root>/{split}/<class>/*.jpeg)")
    samples: List[Tuple[str, int]] = []
    empty = []
    for label, name in enumerate(classes):
        cdir = os.path.join(split_dir, name)
        files = _image_files(cdir)
        if not files:
            empty.append(os.path.abspath(cdir))
        samples.extend((f, label) for f in sorted(files))
    if empty:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise DatasetError(f"{len(empty)} class folder(s) contain no images ({'/'.join(IMG_EXTENSIONS)}): {shown}")
    return samples, classes


def _image_files(folder: str) -> List[str]:
    """Image files under ``folder``, following symlinked folders but never one already visited (a symlink loop
    would otherwise be walked forever)."""
    files, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            _logger.warning("not following %s again (symlink loop or second link to %s)", dirpath, real)
            continue
        seen.add(real)
        files.extend(os.path.join(dirpath, f) for f in filenames
                     if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith("."))
    return files


def collate_readable(batch):
    """Collate for evaluation: drops the ``None`` samples of unreadable images and returns
    ``(images, targets, n_dropped)``, so metrics cover the readable images only."""
    kept = [b for b in batch if b is not None]
    dropped = len(batch) - len(kept)
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), dropped
    images, targets = torch.utils.data.default_collate(kept)
    return images, targets, dropped


def _sample_seed(*parts: int) -> int:
    # cheap, well-mixed 63-bit seed from integers (splitmix64 on a running hash)
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class ImageFolderDataset(torch.utils.data.Dataset):
    """``<root>/<split>/<class>/*`` images -> (transformed image, label).

    Unreadable images are reported by path: with ``bad_image='skip'`` (default) a warning names the file and the
    next readable image is returned instead; with ``bad_image='error'`` a RuntimeError naming the file stops the run.

    With ``seed`` set, the random augmentation of sample ``i`` in epoch ``e`` uses its own RNG state derived from
    ``(seed, e, i)``, so augmentations do not depend on the number of loader workers, the rank, or whether the run
    was resumed: this is what makes ``--resume`` reproduce an uninterrupted run exactly.
    """

    def __init__(self, root: str, split: str, transform=None, bad_image: str = "skip", seed: Optional[int] = None,
                 drop_bad: bool = False):
        if bad_image not in ("skip", "error"):
            raise ValueError(f"bad_image must be 'skip' or 'error', got {bad_image!r}")
        self.root = root
        self.split = split
        self.samples, self.classes = scan_image_folder(root, split)
        self.transform = transform
        self.bad_image = bad_image
        self.seed = seed
        self.drop_bad = drop_bad  # evaluation: an unreadable image yields None (see collate_readable), no stand-in
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int):
        n = len(self.samples)
        for attempt in range(min(n, 50)):
            path, label = self.samples[(index + attempt) % n]
            try:
                with open(path, "rb") as f:
                    img = Image.open(f)
                    img = img.convert("RGB")
                return img, label
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                if self.bad_image == "error":
                    raise RuntimeError(f"unreadable image {path}: {e}") from e
                _logger.warning("skipping unreadable image %s (%s)", path, e)
                if self.drop_bad:
                    return None
        raise RuntimeError(f"50 consecutive unreadable images starting at {self.samples[index][0]}")

    def __getitem__(self, index: int):
        loaded = self._load(index)
        if loaded is None:
            return None
        img, label = loaded
        if self.transform is not None:
            if self.seed is None:
                img = self.transform(img)
            else:
                s = _sample_seed(self.seed, self.epoch, index)
                py_state, np_state, t_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
                try:
                    random.seed(s)
                    np.random.seed(s % (2 ** 32 - 1))
                    torch.default_generator.manual_seed(s)
                    img = self.transform(img)
                finally:
                    random.setstate(py_state)
                    np.random.set_state(np_state)
                    torch.set_rng_state(t_state)
        return img, label


class ResumableSampler(torch.utils.data.Sampler):
    """Shuffled (or ordered) indices, sharded over ``num_replicas`` ranks, able to start mid-epoch.

    The permutation of epoch ``e`` depends only on ``(seed, e)``. Like DistributedSampler, the index list is padded
    (training: by repeating, so every rank runs the same number of steps) or not padded (evaluation:
    ``pad=False`` gives every sample exactly once over all ranks).
    """

    def __init__(self, length: int, shuffle: bool = True, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 pad: bool = True):
        self.length = length
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.pad = pad
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch; ``start`` skips that many of this rank's samples (mid-epoch resume)."""
        self.epoch = epoch
        self.start = start

    def _indices(self) -> List[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed * 100003 + self.epoch)
            idx = torch.randperm(self.length, generator=g).tolist()
        else:
            idx = list(range(self.length))
        if self.pad:
            total = int(math.ceil(self.length / self.num_replicas)) * self.num_replicas
            idx += idx[: total - len(idx)] if total - len(idx) <= len(idx) else (idx * total)[: total - len(idx)]
        return idx[self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start:])

    def __len__(self) -> int:
        if self.pad:
            n = int(math.ceil(self.length / self.num_replicas))
        else:
            n = len(range(self.rank, self.length, self.num_replicas))
        return max(0, n - self.start)

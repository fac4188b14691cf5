"""Datasets for training and validation: readers, bad-image policy, the resumable sampler, fingerprints.

Sources (``open_reader``):

* an image folder ``<root>/<split>/<class>/*.jpeg`` (the default): scanned by :func:`scan_image_folder` with our
  checks (missing/empty folders are errors naming the path; symlinked folders are followed, but a folder already
  visited - a symlink loop, or a link to another class folder - is skipped with a warning);
* a tar file ``<root>/<split>.tar`` (class folders inside, or one tar per class): timm's ``ReaderImageInTar``;
* ``--dataset hfds/<name>``: a Hugging Face dataset through timm's ``ReaderHfds`` (needs the ``datasets`` package).

Every source is a map-style timm ``Reader`` wrapped by :class:`ReaderDataset`, so batches come from our
:class:`ResumableSampler` (shuffle of epoch e depends only on (seed, e); sharded over ranks; can start mid-epoch).
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import random
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

try:
    from timm.data.readers.reader import Reader
except ImportError:  # pragma: no cover - very old timm
    Reader = object

_logger = logging.getLogger("ddf.data")

IMG_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
BAD_IMAGE_CHOICES = ("skip", "error")
MAX_CONSECUTIVE_BAD = 50


class DatasetError(ValueError):
    """A missing/empty/inconsistent dataset; the message names the offending path."""


class UnreadableImageError(DatasetError):
    """An image that cannot be decoded under ``--bad-image error``. Raised inside a DataLoader worker, torch re-raises
    it in the main process as the same type with the worker's traceback in the message: ``str()`` keeps the one
    line that says which file and why (:func:`training.cli.one_line`)."""



# ------------------------------------------------------------------------------------------------ image folders
def _dir_key(path: str) -> Optional[Tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _walk_images(cdir: str, seen: set) -> List[str]:
    """Image files under ``cdir`` (symlinks followed); folders in ``seen`` (already visited) are skipped."""
    files, stack = [], [cdir]
    while stack:
        d = stack.pop()
        if d != cdir:
            key = _dir_key(d)
            if key is None or key in seen:
                _logger.warning("not following %s: it leads to a folder already scanned (symlink loop or link to "
                                "another class)", d)
                continue
            seen.add(key)
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            _logger.warning("cannot list %s: %s", d, e)
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                if e.is_dir():
                    stack.append(e.path)
                elif e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS):
                    files.append(e.path)
            except OSError:  # a dangling or looping link
                continue
    return files


def scan_image_folder(root: str, split: str) -> Tuple[List[Tuple[str, int]], List[str]]:
    """Check ``<root>/<split>/<class>/<images>`` and return ``(samples, class_names)``; DatasetError naming the path
    when the root or split is missing, there are no class folders, or a class folder holds no images."""
    if not root:
        raise DatasetError("data root is empty: pass the dataset folder (containing train/ and val/)")
    if not os.path.isdir(root):
        raise DatasetError(f"data root not found: {os.path.abspath(root)} (expected a folder with train/ and val/)")
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise DatasetError(f"split folder not found: {os.path.abspath(split_dir)} "
                           f"(expected layout <root>/{split}/<class>/*.jpeg, or <root>/{split}.tar)")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DatasetError(f"no class folders in {os.path.abspath(split_dir)} "
                           f"(expected layout <root>/{split}/<class>/*.jpeg)")
    seen = {k for k in [_dir_key(split_dir)] + [_dir_key(os.path.join(split_dir, c)) for c in classes] if k}
    samples: List[Tuple[str, int]] = []
    empty = []
    for label, name in enumerate(classes):
        cdir = os.path.join(split_dir, name)
        files = _walk_images(cdir, seen)
        if not files:
            empty.append(os.path.abspath(cdir))
        samples.extend((f, label) for f in sorted(files))
    if empty:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise DatasetError(f"{len(empty)} class folder(s) contain no images ({'/'.join(IMG_EXTENSIONS)}): {shown}")
    return samples, classes


class FolderReader(Reader):
    """A timm ``Reader`` over the checked samples of :func:`scan_image_folder`."""

    def __init__(self, root: str, split: str):
        super().__init__()
        self.root = os.path.join(root, split)
        self.samples, self.classes = scan_image_folder(root, split)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return path, label

    def __len__(self) -> int:
        return len(self.samples)

    def _filename(self, index, basename=False, absolute=False):
        path = self.samples[index][0]
        if basename:
            return os.path.basename(path)
        return os.path.abspath(path) if absolute else os.path.relpath(path, self.root)


def _tar_classes(reader) -> List[str]:
    mapping = getattr(reader, "class_name_to_idx", None) or getattr(reader, "class_to_idx", None) or {}
    return [name for name, _ in sorted(mapping.items(), key=lambda kv: kv[1])]


def open_reader(root: str, split: str, dataset: str = "") -> Tuple[object, List[str], str]:
    """(reader, class names, description) for ``--dataset`` ``''`` (folder or ``<split>.tar``) or ``hfds/<name>``."""
    prefix, _, name = (dataset or "").partition("/")
    if prefix.lower() == "hfds":
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise DatasetError(f"--dataset {dataset}: needs the Hugging Face 'datasets' package "
                               f"(pip install datasets)") from None
        from timm.data.readers import create_reader
        try:
            reader = create_reader(dataset, root=root, split=split)
        except ValueError as e:  # datasets: 'Unknown split "val". Should be one of [...]'
            if "split" not in str(e).lower():
                raise
            raise DatasetError(f"--dataset {dataset}: no split {split!r} ({e}); choose one with --train-split / "
                               f"--val-split (Hugging Face datasets usually name it 'validation')") from None
        return reader, _tar_classes(reader), f"{dataset} [{split}]"
    if dataset:
        raise DatasetError(f"--dataset {dataset!r} is not supported: use '' (image folder or <split>.tar) or "
                           f"'hfds/<name>' (iterable readers such as wds/, hfids/, tfds/ cannot be resumed exactly)")
    tar = os.path.join(root or "", split + ".tar")
    if root and not os.path.isdir(os.path.join(root, split)) and os.path.isfile(tar):
        from timm.data.readers.reader_image_in_tar import ReaderImageInTar
        try:
            reader = ReaderImageInTar(tar)
        except Exception as e:  # noqa: BLE001 - tarfile raises several types
            raise DatasetError(f"cannot read tar file {os.path.abspath(tar)}: {e}") from None
        if len(reader) == 0:
            raise DatasetError(f"no images in tar file {os.path.abspath(tar)}")
        return reader, _tar_classes(reader), os.path.abspath(tar)
    reader = FolderReader(root, split)
    return reader, reader.classes, os.path.abspath(os.path.join(root, split))


# ---------------------------------------------------------------------------------------------------- dataset
def _sample_seed(*parts: int) -> int:
    # cheap, well-mixed 63-bit seed from integers (splitmix64 on a running hash)
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # one channel, more than 8 bits per pixel
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")


class ImageConversionError(ValueError):
    """An image whose pixel values cannot be mapped to 8 bits without guessing (a bad image under --bad-image)."""


def _wide_to_l(img: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float single-channel image as 8-bit 'L', scaled by value (not clipped):
    16-bit modes (and mode 'I', which is how PIL holds 16-bit PNG/TIFF files, when its values fit 0..65535) map
    0..65535 to 0..255 (v / 257, rounded); float images must hold values in [0, 1], mapped to 0..255."""
    a = np.asarray(img)
    if img.mode == "F":
        if not np.all(np.isfinite(a)):
            raise ImageConversionError("float image with non-finite pixels (nan/inf)")
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if lo < 0.0 or hi > 1.0:
            raise ImageConversionError(f"float image with pixel values in [{lo:g}, {hi:g}]: only [0, 1] can be "
                                       f"mapped to 8 bits without guessing its range")
        out = np.floor(a.astype(np.float64) * 255.0 + 0.5)
    else:
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise ImageConversionError(f"32-bit integer image with pixel values in [{lo}, {hi}]: only 0..65535 "
                                       f"(16-bit) can be mapped to 8 bits without guessing its range")
        out = np.floor(a.astype(np.float64) / 257.0 + 0.5)
    return Image.fromarray(out.astype(np.uint8), "L")


def _on_black(img: Image.Image) -> Image.Image:
    """An image with an alpha channel composited on black (a transparent pixel's stored colour is undefined)."""
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")


def to_model_mode(img: Image.Image, channels: int = 3) -> Image.Image:
    """``img`` as the 8-bit 'RGB' (``channels=3``) or 'L' (``channels=1``) image the model reads.

    EXIF orientation is applied first. 16-bit / 32-bit / float single-channel images are scaled by value
    (:func:`_wide_to_l`); a palette image with transparency and images with an alpha channel (LA, PA, RGBA) are
    composited on black; CMYK uses PIL's conversion (r = (255 - c)(255 - k) / 255). An image that cannot be
    converted raises (a bad image under ``--bad-image``)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    from PIL import ImageOps

    img = ImageOps.exif_transpose(img)
    if img.mode in _WIDE_MODES:
        img = _wide_to_l(img)
    elif img.mode == "P" and "transparency" in img.info:
        img = _on_black(img)
    elif img.mode in _ALPHA_MODES:
        img = _on_black(img)
    if img.mode != "RGB":
        img = img.convert("RGB")  # raises for modes PIL cannot convert (e.g. LAB)
    return img.convert("L") if channels == 1 else img


def _decode(obj, channels: int = 3) -> Image.Image:
    if isinstance(obj, Image.Image):
        return to_model_mode(obj, channels)
    try:
        with Image.open(obj) as img:
            img.load()  # decodes the pixels: a truncated file fails here
            return to_model_mode(img, channels)
    finally:
        if hasattr(obj, "close"):
            obj.close()


class ReaderDataset(torch.utils.data.Dataset):
    """(transformed image, label) from a timm reader, with a policy for unreadable images.

    ``bad_image='skip'``: a warning names the file; for training (``substitute=True``) the next readable image is
    used, for evaluation (``substitute=False``) the sample is dropped (``None``, removed by :func:`collate_skip`,
    counted as skipped). Decompression bombs (PIL's pixel limit) and images :func:`to_model_mode` cannot convert
    count as unreadable. ``bad_image='error'``: a
    RuntimeError naming the file.

    With ``seed`` set, the augmentation of sample ``i`` in epoch ``e`` uses its own RNG state from ``(seed, e, i)``,
    independent of workers, rank and resumption: this is what makes ``--resume`` reproduce an uninterrupted run."""

    def __init__(self, reader, classes: Sequence[str], transform=None, bad_image: str = "skip",
                 seed: Optional[int] = None, substitute: bool = True, source: str = "", channels: int = 3):
        if bad_image not in BAD_IMAGE_CHOICES:
            raise ValueError(f"bad_image must be one of {BAD_IMAGE_CHOICES}, got {bad_image!r}")
        self.reader = reader
        self.classes = list(classes)
        self.transform = transform
        self.bad_image = bad_image
        self.seed = seed
        self.substitute = substitute
        self.source = source
        self.channels = channels  # images are decoded to 'RGB' (3) or 'L' (1): see to_model_mode
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.reader)

    def filename(self, index: int) -> str:
        name = self.reader.filename(index, absolute=True)
        return name if os.path.isabs(str(name)) else f"{self.source}:{name}"

    def _try(self, index: int):
        try:
            obj, label = self.reader[index][:2]
            return _decode(obj, self.channels), label
        except Exception as e:  # noqa: BLE001 - any decode failure (incl. DecompressionBombError) is a bad image
            path = self.filename(index)
            if self.bad_image == "error":
                raise UnreadableImageError(f"unreadable image {path}: {type(e).__name__}: {e} (use --bad-image skip "
                                           f"to skip such files)") from e
            _logger.warning("skipping unreadable image %s (%s: %s)", path, type(e).__name__, e)
            return None

    def _load(self, index: int):
        n = len(self)
        for attempt in range(min(n, MAX_CONSECUTIVE_BAD) if self.substitute else 1):
            got = self._try((index + attempt) % n)
            if got is not None:
                return got
        if not self.substitute:
            return None
        raise UnreadableImageError(f"{MAX_CONSECUTIVE_BAD} consecutive unreadable images starting at "
                                   f"{self.filename(index)}")

    def __getitem__(self, index: int):
        got = self._load(index)
        if got is None:
            return None
        img, label = got
        if self.transform is not None:
            if self.seed is None:
                img = self.transform(img)
            else:
                img = self._seeded_transform(img, _sample_seed(self.seed, self.epoch, index))
        return img, label

    def _seeded_transform(self, img, s: int):
        py_state, np_state, t_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            random.seed(s)
            np.random.seed(s % (2 ** 32 - 1))
            torch.default_generator.manual_seed(s)
            return self.transform(img)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            torch.set_rng_state(t_state)


def collate_skip(batch):
    """Collate for evaluation: drops the ``None`` of skipped images; returns (images, targets, n_skipped)."""
    good = [b for b in batch if b is not None]
    if not good:
        return None, None, len(batch)
    images, targets = torch.utils.data.default_collate(good)
    return images, targets, len(batch) - len(good)


def create_dataset(root: str, split: str, dataset: str = "", bad_image: str = "skip", seed: Optional[int] = None,
                   substitute: bool = True) -> ReaderDataset:
    reader, classes, source = open_reader(root, split, dataset)
    return ReaderDataset(reader, classes, bad_image=bad_image, seed=seed, substitute=substitute, source=source)


def _names_and_labels(reader) -> Optional[List[Tuple[str, int]]]:
    if isinstance(reader, FolderReader):
        return [(reader._filename(i), label) for i, (_, label) in enumerate(reader.samples)]
    targets = getattr(reader, "targets", None)
    if hasattr(reader, "samples") and targets is not None:  # timm's tar readers
        return [(os.path.normpath(reader.filename(i)), int(targets[i])) for i in range(len(reader))]
    return None  # e.g. Hugging Face datasets: count and classes only


def fingerprint(ds: ReaderDataset) -> Dict[str, object]:
    """What identifies a training set for ``--resume``: sample count, classes and a hash of the (file name relative
    to the split, label) pairs, so the same data moved elsewhere keeps its fingerprint."""
    pairs = _names_and_labels(ds.reader)
    files = None
    if pairs is not None:
        h = hashlib.sha256()
        for name, label in pairs:
            h.update(f"{name}\t{label}\n".encode())
        files = h.hexdigest()[:16]
    return {"samples": len(ds), "classes": len(ds.classes),
            "classes_sha256": hashlib.sha256("\n".join(ds.classes).encode()).hexdigest()[:16], "files_sha256": files}


# ---------------------------------------------------------------------------------------------------- sampler
class ResumableSampler(torch.utils.data.Sampler):
    """Shuffled (or ordered) indices, sharded over ``num_replicas`` ranks, able to start mid-epoch.

    The permutation of epoch ``e`` depends only on ``(seed, e)``, so every epoch has its own order. Like
    DistributedSampler, the index list is padded (training: by repeating, so every rank runs the same number of
    steps) or not padded (evaluation: ``pad=False`` gives every sample exactly once over all ranks)."""

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

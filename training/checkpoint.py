"""Atomic checkpoint writing, a last/best/top-k saver, and checkpoint loading for train.py and validate.py."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from typing import Any, Dict, List, Optional, Tuple

import torch

from ddf.state_dict import unwrap_state_dict


_logger = logging.getLogger(__name__)
CHECKSUM_SUFFIX = ".sha256"


def atomic_write_bytes(data: bytes, path: str) -> None:
    """Write ``data`` to a temporary file in the same folder, fsync, then os.replace onto ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_save(obj: Any, path: str) -> None:
    """torch.save ``obj`` atomically to ``path`` and write its sha256 to ``path + '.sha256'`` (checked on load)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    atomic_write_bytes(data, path)
    atomic_write_bytes((hashlib.sha256(data).hexdigest() + "\n").encode(), path + CHECKSUM_SUFFIX)


def verify_checksum(path: str) -> bool:
    """True when ``path`` matches its ``.sha256`` sidecar, False when there is none; ValueError on a mismatch."""
    sidecar = path + CHECKSUM_SUFFIX
    if not os.path.isfile(sidecar):
        return False
    with open(sidecar) as f:
        expected = f.read().strip()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise ValueError(f"checkpoint {os.path.abspath(path)} is damaged: its sha256 does not match "
                         f"{os.path.basename(sidecar)} (flipped bytes, a truncated copy, or a crash between writing "
                         "the file and its checksum); not loading it")
    return True


class CheckpointSaver:
    """Keeps ``last.pth.tar``, ``model_best.pth.tar`` and the ``top_k`` best epochs
    (``checkpoint-<epoch>.pth.tar``), every file written atomically. The ranking is kept in ``checkpoints.json``
    (also atomic) so that it survives a resume."""

    def __init__(self, out_dir: str, top_k: int = 3, decreasing: bool = False):
        self.out_dir = out_dir
        self.top_k = top_k
        self.decreasing = decreasing
        self.index_path = os.path.join(out_dir, "checkpoints.json")
        self.ranked: List[Tuple[float, int, str]] = []  # (metric, epoch, path), best first
        self.best: Optional[Tuple[float, int]] = None
        if os.path.isfile(self.index_path):
            with open(self.index_path) as f:
                state = json.load(f)
            # older indexes stored absolute paths: keep only the file name, resolved in this run folder
            self.ranked = [(r[0], r[1], os.path.basename(r[2])) for r in state.get("ranked", [])]
            self.best = tuple(state["best"]) if state.get("best") else None

    @property
    def last_path(self) -> str:
        return os.path.join(self.out_dir, "last.pth.tar")

    @property
    def best_path(self) -> str:
        return os.path.join(self.out_dir, "model_best.pth.tar")

    def _better(self, a: float, b: float) -> bool:
        return a < b if self.decreasing else a > b

    def _write_index(self) -> None:
        """checkpoints.json, written atomically; file names are relative to the run folder."""
        data = json.dumps({"ranked": self.ranked, "best": self.best}, indent=1).encode()
        atomic_write_bytes(data, self.index_path)

    def _own(self, name: str) -> str:
        """A checkpoint listed in the index, as a path inside this run folder (never outside it)."""
        return os.path.join(self.out_dir, os.path.basename(name))

    def save_last(self, state: Dict) -> str:
        atomic_save(state, self.last_path)
        return self.last_path

    def save_epoch(self, state: Dict, epoch: int, metric: float) -> Optional[Tuple[float, int]]:
        """Write last (+ best, + top-k) for a finished epoch; return (best metric, best epoch).

        A tie never replaces the best: the earlier epoch stays best (and ranks first among equal top-k entries).
        """
        atomic_save(state, self.last_path)
        if self.best is None or self._better(metric, self.best[0]):
            atomic_save(state, self.best_path)
            self.best = (metric, epoch)
        if self.top_k > 0:
            ranked = [r for r in self.ranked if r[1] != epoch]
            worst_ok = len(ranked) < self.top_k or self._better(metric, ranked[-1][0])
            if worst_ok:
                name = f"checkpoint-{epoch}.pth.tar"
                atomic_save(state, self._own(name))
                ranked.append((metric, epoch, name))
                # ties: the earlier epoch ranks first (it reached the metric first)
                ranked.sort(key=lambda r: (r[0] if self.decreasing else -r[0], r[1]))
                for _, _, p in ranked[self.top_k:]:
                    for f in (self._own(p), self._own(p) + CHECKSUM_SUFFIX):
                        if os.path.exists(f):
                            os.unlink(f)
                ranked = ranked[: self.top_k]
            self.ranked = ranked
        self._write_index()
        return self.best


def load_checkpoint_file(path: str) -> Dict:
    """Load a checkpoint onto the CPU. Raises FileNotFoundError naming the path when missing."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {os.path.abspath(path)}")
    if not verify_checksum(path):
        _logger.warning("checkpoint %s has no %s checksum (written by an older version or another tool); loading "
                        "it unverified", path, CHECKSUM_SUFFIX)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except TypeError:  # very old torch without weights_only
        ckpt = torch.load(path, map_location="cpu")
    return ckpt


def extract_state_dict(ckpt: Any, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """Model weights of a checkpoint: :func:`ddf.state_dict.unwrap_state_dict` (the plain weights unless
    ``use_ema``)."""
    return unwrap_state_dict(ckpt, use_ema=bool(use_ema))

"""Verified checkpoint files, loading, and the last / best / top-k saver with its index.

File format: what ``torch.save`` writes (a zip archive; ``torch.load`` and other tools read it as before) plus one
extra record ``<archive>/.data/ddf_sha256`` holding the sha256 of every other record (names and bytes, in name
order). :func:`load_checkpoint` recomputes it, so a flipped byte anywhere gives a :class:`CheckpointError` naming the
file instead of silently wrong weights. Checkpoints written before this record existed are still loaded: their zip
CRC-32s are verified instead (with a warning); a file in torch's legacy (non-zip) format cannot be verified and is
loaded with a warning.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import zipfile
from typing import Any, Dict, List, Optional, Tuple

import torch

from ddf.state_dict import unwrap_state_dict

from .io import atomic_write

_logger = logging.getLogger("ddf.checkpoint")

CHECKSUM_RECORD = ".data/ddf_sha256"
INDEX_NAME = "checkpoints.json"
LAST_NAME = "last.pth.tar"
BEST_NAME = "model_best.pth.tar"
_EPOCH_FILE = re.compile(r"^checkpoint-(\d+)\.pth\.tar$")

__all__ = ["CheckpointError", "save_checkpoint", "verify_checkpoint", "load_checkpoint", "CheckpointSaver",
           "checkpoint_dict", "continues_in_place", "is_run_folder", "run_finished",
           "unwrap_state_dict"]


class CheckpointError(ValueError):
    """A checkpoint file that is missing, damaged or not a checkpoint; the message names the file."""


def _records_sha256(zf: zipfile.ZipFile) -> Tuple[str, Optional[str]]:
    """(sha256 over all records except the checksum record, stored checksum or None)."""
    h = hashlib.sha256()
    stored = None
    for name in sorted(zf.namelist()):
        if name.endswith("/" + CHECKSUM_RECORD):
            stored = json.loads(zf.read(name).decode())["sha256"]
            continue
        h.update(name.encode() + b"\0")
        with zf.open(name) as f:  # zipfile also checks each record's CRC-32 while reading
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest(), stored


def _write_verified(obj: Any, path: str) -> None:
    with open(path, "wb") as f:  # a Python file: a full disk surfaces as OSError(ENOSPC), not torch's 'unexpected pos'
        torch.save(obj, f)
    with zipfile.ZipFile(path, "a") as zf:
        digest, _ = _records_sha256(zf)
        prefix = zf.namelist()[0].split("/", 1)[0]
        zf.writestr(f"{prefix}/{CHECKSUM_RECORD}", json.dumps({"sha256": digest}))


def _no_space(e: Optional[BaseException]) -> bool:
    """True when ``e`` or an exception it was raised from/during is OSError ENOSPC / EDQUOT (torch.save re-raises a
    failed write of its file object as a RuntimeError whose context is the OSError)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    return False


def _no_space_error(path: str) -> CheckpointError:
    full = os.path.abspath(path)
    try:
        verify_checkpoint(full)
        kept = f"the previous checkpoint {full} is intact"
    except CheckpointError:
        kept = f"no checkpoint was written to {full}"
    return CheckpointError(f"no space left on {os.path.dirname(full)}; {kept}")


def save_checkpoint(obj: Any, path: str) -> str:
    """``torch.save`` + checksum record, written atomically (see :func:`training.io.atomic_write`). A full disk is a
    :class:`CheckpointError` ``no space left on <dir>; the previous checkpoint <file> is intact``."""
    try:
        return atomic_write(path, lambda tmp: _write_verified(obj, tmp))
    except Exception as e:  # noqa: BLE001 - only a full disk is translated
        if not _no_space(e):
            raise
        raise _no_space_error(path) from None


def verify_checkpoint(path: str) -> str:
    """Check ``path`` against its stored sha256 (or its zip CRCs). Returns 'sha256', 'crc' or 'unverified'."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {os.path.abspath(path)}")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(4)
        if head[:2] == b"\x80\x02" or head[:1] == b"\x80":  # torch's legacy pickle format
            _logger.warning("checkpoint %s is in torch's legacy format and cannot be verified", path)
            return "unverified"
        raise CheckpointError(f"checkpoint {os.path.abspath(path)} is damaged or not a checkpoint "
                              f"(not a zip archive written by torch.save)")
    try:
        with zipfile.ZipFile(path) as zf:
            digest, stored = _records_sha256(zf)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, KeyError, EOFError) as e:
        raise CheckpointError(f"checkpoint {os.path.abspath(path)} is damaged: {e}") from None
    if stored is None:
        _logger.warning("checkpoint %s has no stored checksum (written before checksums); its zip CRCs are intact",
                        path)
        return "crc"
    if stored != digest:
        raise CheckpointError(f"checkpoint {os.path.abspath(path)} is damaged: sha256 of its contents is "
                              f"{digest[:16]}..., the file records {stored[:16]}...")
    return "sha256"


def _legacy_numpy_globals() -> List[Any]:
    """The numpy types that checkpoints written before 2026-12-07 hold (numpy's RNG state as an ndarray): data
    containers only, nothing that runs code. New checkpoints store it as plain data and need none of them."""
    import numpy as np

    multiarray = getattr(np, "_core", None)
    multiarray = getattr(multiarray, "multiarray", None) or np.core.multiarray
    found = [np.ndarray, np.dtype, multiarray._reconstruct]
    found += [t for t in (getattr(np.dtypes, "UInt32DType", None), getattr(np.dtypes, "Int64DType", None)) if t]
    return found


def _refusal(path: str, err: Exception) -> CheckpointError:
    unsafe = []
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - legacy format: no listing, the pickle error below says enough
        pass
    what = f"it holds {', '.join(unsafe[:4])}" if unsafe else f"{str(err).splitlines()[0][:200]}"
    return CheckpointError(
        f"checkpoint {os.path.abspath(path)} needs arbitrary code to load ({what}), so it was refused; only load a "
        f"file you trust that way: pass --trust-checkpoint (runs its code), or convert it once with "
        f"`python tools/convert_checkpoint.py {path} OUT.pth.tar` (also runs its code, once, then writes plain data)")


def load_checkpoint(path: str, trust: bool = False) -> Any:
    """Verify, then load onto the CPU without running any code from the file.

    ``torch.load(weights_only=True)`` with an allow-list of the few plain container types our older checkpoints hold
    (``argparse.Namespace``, numpy arrays); a file that needs anything else is refused with a
    :class:`CheckpointError` that says how to load a trusted file. ``trust=True`` (``--trust-checkpoint``) uses
    full unpickling, which runs the file's code. Raises :class:`CheckpointError` naming the file when missing or
    damaged."""
    import argparse
    import pickle

    verify_checkpoint(path)
    try:
        if trust:
            _logger.warning("loading %s with full unpickling (--trust-checkpoint): it can run code", path)
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals([argparse.Namespace, *_legacy_numpy_globals()]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if trust:
            raise CheckpointError(f"checkpoint {os.path.abspath(path)} cannot be loaded: {e}") from e
        raise _refusal(path, e) from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise CheckpointError(f"checkpoint {os.path.abspath(path)} cannot be loaded: {type(e).__name__}: {e}") from e


def model_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """State dict of the model inside DDP / torch.compile / EMA wrappers (timm's unwrap_model)."""
    from timm.utils import unwrap_model
    return unwrap_model(model).state_dict()


def checkpoint_dict(obj: Any, path: str, option: str) -> Dict:
    """``obj`` if it is a dict; otherwise a :class:`CheckpointError` naming ``option`` and the file."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{option} {os.path.abspath(path)} holds a {type(obj).__name__}, not a checkpoint "
                              f"(a dict with 'state_dict', or a state dict)")
    return obj


def is_run_folder(folder: str) -> bool:
    """A folder train.py started a run in: it holds the ``args.yaml`` written before the first step."""
    return os.path.isfile(os.path.join(folder, "args.yaml"))


def run_finished(ckpt: Dict) -> bool:
    """True when an epoch-end checkpoint is the last epoch of its run (``args.epochs`` + ``cooldown_epochs``)."""
    a = ckpt.get("args") or {}
    a = a if isinstance(a, dict) else vars(a)
    if not a.get("epochs") or int(ckpt.get("step", 0) or 0):
        return False
    return int(ckpt.get("epoch", -1)) + 1 >= int(a["epochs"]) + int(a.get("cooldown_epochs") or 0)


def continues_in_place(resume_path: str, ckpt: Optional[Dict] = None) -> Optional[str]:
    """The run folder a resume from ``resume_path`` continues in, or None when it must start a new run folder.

    Only a run folder's own ``last.pth.tar`` continues in place, and only while that run is unfinished; any other
    file (``checkpoint-<N>.pth.tar``, ``model_best.pth.tar``, a state dict in a folder of one's own) starts a new
    run folder, so nothing a resume did not create is rewritten. The file must be a train.py checkpoint (with
    ``args`` and ``epoch``) in a folder holding ``args.yaml``. ``ckpt``: the loaded file, to tell a finished run
    (loaded from ``resume_path`` when omitted)."""
    path = os.path.abspath(resume_path)
    folder = os.path.dirname(path)
    if os.path.basename(path) != LAST_NAME or not is_run_folder(folder):
        return None
    if ckpt is None:
        ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or "args" not in ckpt or "epoch" not in ckpt or run_finished(ckpt):
        return None
    return folder


class CheckpointSaver:
    """Keeps ``last.pth.tar``, ``model_best.pth.tar`` and the ``top_k`` best epochs (``checkpoint-<epoch>.pth.tar``)
    in one run folder, every file written atomically, the ranking in ``checkpoints.json`` (also atomic).

    The index stores file names relative to the folder it lives in, and pruning only deletes ``checkpoint-<N>.pth.tar``
    files of that folder which the index lists: a copied run folder never touches the original's files.

    Ties: a metric equal to the best does not replace it (the earliest epoch with the best value stays
    ``model_best``), and in the top-k ranking equal metrics are ordered by epoch, earlier first, so a new epoch
    enters a full top-k only when it is strictly better than the worst kept one."""

    def __init__(self, out_dir: str, top_k: int = 3, decreasing: bool = False):
        self.out_dir = os.path.abspath(out_dir)
        self.top_k = top_k
        self.decreasing = decreasing
        self.index_path = os.path.join(self.out_dir, INDEX_NAME)
        self.ranked: List[Tuple[float, int, str]] = []  # (metric, epoch, file name), best first
        self.best: Optional[Tuple[float, int]] = None
        if os.path.isfile(self.index_path):
            self._read_index()

    def _read_index(self) -> None:
        try:
            with open(self.index_path) as f:
                state = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint index {self.index_path} is unreadable: {e}") from None
        try:
            for metric, epoch, name in state.get("ranked", []):
                base = os.path.basename(str(name))  # old indexes stored absolute paths: keep only the file name
                if _EPOCH_FILE.match(base):
                    self.ranked.append((float(metric), int(epoch), base))
            best = state.get("best")
            self.best = (float(best[0]), int(best[1])) if best else None
        except (AttributeError, TypeError, ValueError, IndexError, KeyError):
            raise CheckpointError(f"checkpoint index {self.index_path} is malformed: expected "
                                  f'{{"ranked": [[metric, epoch, file], ...], "best": [metric, epoch]}}') from None

    @property
    def last_path(self) -> str:
        return os.path.join(self.out_dir, LAST_NAME)

    @property
    def best_path(self) -> str:
        return os.path.join(self.out_dir, BEST_NAME)

    def _better(self, a: float, b: float) -> bool:
        return a < b if self.decreasing else a > b

    def _write_index(self) -> None:
        atomic_write(self.index_path, json.dumps({"ranked": [list(r) for r in self.ranked], "best": self.best,
                                                  "paths": "relative to this folder"}, indent=1))

    def save_last(self, state: Dict) -> str:
        return save_checkpoint(state, self.last_path)

    def save_epoch(self, state: Dict, epoch: int, metric: float) -> Optional[Tuple[float, int]]:
        """Write last (+ best, + top-k) for a finished epoch; return (best metric, best epoch)."""
        save_checkpoint(state, self.last_path)
        if self.best is None or self._better(metric, self.best[0]):
            save_checkpoint(state, self.best_path)
            self.best = (metric, epoch)
        if self.top_k > 0:
            self._rank(state, epoch, metric)
        self._write_index()
        return self.best

    def _rank(self, state: Dict, epoch: int, metric: float) -> None:
        ranked = [r for r in self.ranked if r[1] != epoch]
        if len(ranked) < self.top_k or self._better(metric, ranked[-1][0]):
            name = f"checkpoint-{epoch}.pth.tar"
            save_checkpoint(state, os.path.join(self.out_dir, name))
            ranked.append((metric, epoch, name))
            ranked.sort(key=lambda r: (r[0] if self.decreasing else -r[0], r[1]))
            for _, _, old in ranked[self.top_k:]:
                self._prune(old)
            ranked = ranked[: self.top_k]
        self.ranked = ranked

    def _prune(self, name: str) -> None:
        if not _EPOCH_FILE.match(name) or os.path.basename(name) != name:
            return
        path = os.path.join(self.out_dir, name)
        if os.path.isfile(path) and not os.path.islink(path):
            os.unlink(path)

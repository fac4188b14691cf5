"""Verified checkpoint files, loading, and the epoch-end save: last / best / top-k / summary.csv as one transaction
that the index ``checkpoints.json`` commits (:class:`CheckpointSaver`), and a restart's recovery
(:func:`recover_run_folder`). ``DDF_TEST_KILL_AT=<step>[:<epoch>]`` (:data:`SAVE_STEPS`) makes a save SIGKILL its
process at that step; tests/test_save_transaction.py kills it at every step.

File format: what ``torch.save`` writes (a zip archive; ``torch.load`` and other tools read it as before) plus one
extra record ``<archive>/.data/ddf_sha256`` holding the sha256 of every other record (names and bytes, in name
order). :func:`load_checkpoint` recomputes it, so a flipped byte anywhere gives a :class:`CheckpointError` naming the
file instead of silently wrong weights. Checkpoints written before this record existed are still loaded: their zip
CRC-32s are verified instead (with a warning); a file in torch's legacy (non-zip) format cannot be verified and is
loaded with a warning.
"""
from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import signal
import zipfile
from typing import Any, Dict, List, Optional, Tuple

import torch

from ddf.state_dict import unwrap_state_dict

from .io import atomic_write, fsync_dir, is_temp_of, remove_quietly, write_temp

_logger = logging.getLogger("ddf.checkpoint")

CHECKSUM_RECORD = ".data/ddf_sha256"
INDEX_NAME = "checkpoints.json"
LAST_NAME = "last.pth.tar"
BEST_NAME = "model_best.pth.tar"
SUMMARY_NAME = "summary.csv"
_EPOCH_FILE = re.compile(r"^checkpoint-(\d+)\.pth\.tar$")
# temporaries (training.io.write_temp) of the files a run writes into its folder; a restart removes uncommitted ones
_RUN_TEMP = re.compile(r"^\.(last\.pth\.tar|model_best\.pth\.tar|checkpoint-\d+\.pth\.tar|checkpoints\.json|"
                       r"summary\.csv|args\.yaml)\.[A-Za-z0-9_]+\.tmp$")
KILL_ENV = "DDF_TEST_KILL_AT"
# the steps of an epoch-end save, in order (each a crash point for KILL_ENV); staged-best/-checkpoint/-summary and
# their renamed- steps happen only when that file is part of the save
SAVE_STEPS = ("staged-last", "staged-best", "staged-checkpoint", "staged-summary", "staged-index", "committed",
              "renamed-last", "renamed-best", "renamed-checkpoint", "renamed-summary", "pruned")

__all__ = ["CheckpointError", "save_checkpoint", "write_verified", "verify_checkpoint", "load_checkpoint",
           "CheckpointSaver", "checkpoint_dict", "continues_in_place", "is_run_folder", "run_finished", "read_index",
           "recover_run_folder", "summary_text", "unwrap_state_dict"]


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


def write_verified(obj: Any, path: str) -> None:
    """``torch.save`` + checksum record into ``path`` itself (not atomic: for a temporary file the caller renames;
    use :func:`save_checkpoint` otherwise)."""
    _write_verified(obj, path)


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


# ------------------------------------------------------------------------------------ the epoch-end transaction
def _crash_point(step: str, epoch: int) -> None:
    """Test hook: with ``DDF_TEST_KILL_AT=<step>`` or ``<step>:<epoch>`` (a name in :data:`SAVE_STEPS`) the process
    SIGKILLs itself right after that step of an epoch-end save, as the OOM killer would."""
    want = os.environ.get(KILL_ENV)
    if want and want in (step, f"{step}:{epoch}"):
        os.kill(os.getpid(), signal.SIGKILL)


def _kind(name: str) -> str:
    return {LAST_NAME: "last", BEST_NAME: "best", SUMMARY_NAME: "summary"}.get(name, "checkpoint")


def _final_name(name: str) -> bool:
    return name in (LAST_NAME, BEST_NAME, SUMMARY_NAME) or bool(_EPOCH_FILE.match(name))


def summary_text(rows: List[Dict]) -> str:
    """``summary.csv`` for ``rows``: one row each, every row's columns (a column a row lacks is empty)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _read_summary(path: str) -> Optional[List[Dict]]:
    """The rows of a summary.csv; None when it is missing or unreadable."""
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error):
        return None


def _no_index() -> Dict:
    return {"ranked": [], "best": None, "rows": None, "epoch": None, "staged": {}, "prune": []}


def read_index(path: str) -> Dict:
    """The committed state a ``checkpoints.json`` records: ``ranked`` [(metric, epoch, file)], best first; ``best``
    (metric, epoch) or None; ``rows``, the summary rows of the committed epochs (None in an index written before it
    held them); ``epoch``, the last committed epoch; ``staged`` {final name: temporary name} and ``prune`` (file names),
    what the last save still had to rename and delete after its commit. :class:`CheckpointError` when unreadable or
    malformed."""
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint index {path} is unreadable: {e}") from None
    try:
        ranked = []
        for metric, epoch, name in state.get("ranked", []):
            base = os.path.basename(str(name))  # old indexes stored absolute paths: keep only the file name
            if _EPOCH_FILE.match(base):
                ranked.append((float(metric), int(epoch), base))
        best = state.get("best")
        rows = state.get("rows")
        rows = None if rows is None else [dict(r) for r in rows]
        staged = {str(k): str(v) for k, v in (state.get("staged") or {}).items()}
        prune = [str(n) for n in state.get("prune") or []]
        if (any("epoch" not in r for r in rows or []) or any(not _EPOCH_FILE.match(n) for n in prune)
                or any(not _final_name(k) or not is_temp_of(v, k) for k, v in staged.items())):
            raise ValueError("bad entry")
        epoch = state.get("epoch")
        return {"ranked": ranked, "best": (float(best[0]), int(best[1])) if best else None, "rows": rows,
                "epoch": None if epoch is None else int(epoch), "staged": staged, "prune": prune}
    except (AttributeError, TypeError, ValueError, IndexError, KeyError):
        raise CheckpointError(f"checkpoint index {path} is malformed: expected "
                              f'{{"ranked": [[metric, epoch, file], ...], "best": [metric, epoch]}}') from None


def _prune(folder: str, name: str) -> None:
    """Delete ``checkpoint-<N>.pth.tar`` of ``folder`` (never another name, a path, or a link)."""
    if not _EPOCH_FILE.match(name) or os.path.basename(name) != name:
        return
    path = os.path.join(folder, name)
    if os.path.isfile(path) and not os.path.islink(path):
        os.unlink(path)


def _finish(folder: str, staged: Dict[str, str], prune: List[str], epoch: Optional[int] = None) -> None:
    """After the index commit: rename the staged temporaries onto their names, then prune what left the top-k.
    ``epoch``: the save in progress (its crash points), None when a restart finishes a killed save."""
    for final, tmp in staged.items():
        os.replace(os.path.join(folder, tmp), os.path.join(folder, final))
        if epoch is not None:
            _crash_point(f"renamed-{_kind(final)}", epoch)
    fsync_dir(folder)
    for name in prune:
        _prune(folder, name)
    if epoch is not None:
        _crash_point("pruned", epoch)


def _summary_stale(folder: str, rows: Optional[List[Dict]]) -> bool:
    """True when summary.csv does not hold exactly one row per committed epoch (the index's ``rows``)."""
    if not rows:
        return False
    have = _read_summary(os.path.join(folder, SUMMARY_NAME))
    return have is None or [r.get("epoch") for r in have] != [str(r["epoch"]) for r in rows]


def recover_run_folder(folder: str, dry_run: bool = False) -> List[str]:
    """Bring a run folder back to its last committed epoch-end save, from any crash point. The index
    (``checkpoints.json``) is the only source of truth: a save killed after its commit is completed (the
    temporaries it names are renamed into place, the files that left the top-k pruned); the temporary files of
    anything not committed (``.<run file>.<random>.tmp``: an epoch-end save killed before its commit, a killed
    ``last``/``args.yaml`` write) are removed; ``summary.csv`` is rebuilt from the index's rows when it does not
    hold exactly one row per committed epoch. Only the holder of the folder's ``run.lock`` may call it (a live
    run's temporaries are not orphans). Returns what was done (``dry_run``: what would be), [] when nothing."""
    if not os.path.isdir(folder):
        return []
    index_path = os.path.join(folder, INDEX_NAME)
    index = read_index(index_path) if os.path.isfile(index_path) else _no_index()
    names = set(os.listdir(folder))
    staged = {final: tmp for final, tmp in index["staged"].items() if tmp in names}
    kept = {r[2] for r in index["ranked"]}
    prune = [n for n in index["prune"] if n in names and n not in kept]
    orphans = sorted(n for n in names if _RUN_TEMP.match(n) and n not in staged.values())
    rebuild = SUMMARY_NAME not in staged and _summary_stale(folder, index["rows"])
    done = []
    if staged or prune:
        done.append(f"completed the committed save of epoch {index['epoch']} ({', '.join([*staged, *prune])})")
    if orphans:
        done.append(f"removed {len(orphans)} temporary file(s) of an uncommitted write ({', '.join(orphans[:4])})")
    if rebuild:
        done.append(f"rebuilt {SUMMARY_NAME} from {INDEX_NAME} (one row per committed epoch)")
    if dry_run or not done:
        return done
    _finish(folder, staged, prune)
    for name in orphans:
        remove_quietly(os.path.join(folder, name))
    if rebuild:
        atomic_write(os.path.join(folder, SUMMARY_NAME), summary_text(index["rows"]))
    _logger.warning("run folder %s was interrupted while saving: %s", folder, "; ".join(done))
    return done


def _legacy_rows(path: str) -> List[Dict]:
    """summary.csv rows of a run whose index predates ``rows`` (one per epoch, the last written wins)."""
    rows = {str(r.get("epoch")): r for r in _read_summary(path) or []}
    return list(rows.values())


class CheckpointSaver:
    """Keeps ``last.pth.tar``, ``model_best.pth.tar``, the ``top_k`` best epochs (``checkpoint-<epoch>.pth.tar``) and
    ``summary.csv`` in one run folder; ``checkpoints.json`` (the index) is the single record of what is committed.

    An epoch-end save (:meth:`save_epoch`) is one transaction: every file is written to a temporary name and fsynced,
    then the index naming them (with the ranking, the best and every committed epoch's summary row) is committed by
    an atomic rename + folder fsync; only then are the temporaries renamed onto their names and dropped top-k files
    pruned. Creating a saver first runs :func:`recover_run_folder`, so a save killed at any step is either not there
    at all (before the commit: the run redoes that epoch) or completed (after it); best and top-k always come from
    the index, never from whichever file is newest.

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
        recover_run_folder(self.out_dir)
        index = read_index(self.index_path) if os.path.isfile(self.index_path) else _no_index()
        self.ranked: List[Tuple[float, int, str]] = index["ranked"]  # (metric, epoch, file name), best first
        self.best: Optional[Tuple[float, int]] = index["best"]
        self.epoch: Optional[int] = index["epoch"]
        self.rows: List[Dict] = index["rows"] if index["rows"] is not None else _legacy_rows(self.summary_path)

    @property
    def last_path(self) -> str:
        return os.path.join(self.out_dir, LAST_NAME)

    @property
    def best_path(self) -> str:
        return os.path.join(self.out_dir, BEST_NAME)

    @property
    def summary_path(self) -> str:
        return os.path.join(self.out_dir, SUMMARY_NAME)

    def _better(self, a: float, b: float) -> bool:
        return a < b if self.decreasing else a > b

    def save_last(self, state: Dict) -> str:
        """A mid-epoch ``last.pth.tar`` (one atomic file; the index is not touched)."""
        return save_checkpoint(state, self.last_path)

    def save_epoch(self, state: Dict, epoch: int, metric: Optional[float],
                   row: Optional[Dict] = None) -> Optional[Tuple[float, int]]:
        """Save a finished epoch as one transaction (see the class): last (+ best, + top-k when ``metric`` earns it;
        ``metric`` None: an epoch without a metric, never a best) and, with ``row``, its summary.csv row. Returns
        (best metric, best epoch). Nothing changes on disk or here when it fails before the commit."""
        best, ranked, files, prune = self._plan(epoch, metric)
        rows = self.rows if row is None else [r for r in self.rows if str(r.get("epoch")) != str(epoch)] + [dict(row)]
        staged: Dict[str, str] = {}
        try:
            self._stage(state, epoch, files, rows if row is not None else None, staged)
            self._commit(epoch, best, ranked, rows, staged, prune)
        except BaseException as e:
            for tmp in staged.values():
                remove_quietly(os.path.join(self.out_dir, tmp))
            if isinstance(e, Exception) and _no_space(e):
                raise _no_space_error(self.last_path) from None
            raise
        _crash_point("committed", epoch)
        self.best, self.ranked, self.rows, self.epoch = best, ranked, rows, epoch
        _finish(self.out_dir, staged, prune, epoch)
        return self.best

    def _plan(self, epoch: int, metric: Optional[float]):
        """(best, ranked, files to write: last first, files to prune) after this epoch; nothing is changed yet."""
        best, ranked, files = self.best, list(self.ranked), [LAST_NAME]
        if metric is not None and (best is None or self._better(metric, best[0])):
            best = (metric, epoch)
            files.append(BEST_NAME)
        prune: List[str] = []
        if metric is not None and self.top_k > 0:
            prune = [r[2] for r in ranked if r[1] == epoch]  # an epoch saved again: its earlier entry goes
            ranked = [r for r in ranked if r[1] != epoch]
            if len(ranked) < self.top_k or self._better(metric, ranked[-1][0]):
                name = f"checkpoint-{epoch}.pth.tar"
                files.append(name)
                ranked.append((metric, epoch, name))
                ranked.sort(key=lambda r: (r[0] if self.decreasing else -r[0], r[1]))
                prune += [r[2] for r in ranked[self.top_k:]]
                ranked = ranked[: self.top_k]
        return best, ranked, files, [n for n in prune if n not in files]

    def _stage(self, state: Dict, epoch: int, files: List[str], rows: Optional[List[Dict]],
               staged: Dict[str, str]) -> None:
        """Write each file of the save to a fsynced temporary next to its name; ``staged`` maps final name to
        temporary name as each is written (so a failure can remove them all)."""
        first = write_temp(self.last_path, lambda tmp: _write_verified(state, tmp))
        staged[LAST_NAME] = os.path.basename(first)
        _crash_point("staged-last", epoch)
        for name in files[1:]:  # best / top-k: the same verified bytes
            tmp = write_temp(os.path.join(self.out_dir, name), lambda t: shutil.copyfile(first, t))
            staged[name] = os.path.basename(tmp)
            _crash_point(f"staged-{_kind(name)}", epoch)
        if rows is not None:
            staged[SUMMARY_NAME] = os.path.basename(write_temp(self.summary_path, summary_text(rows)))
            _crash_point("staged-summary", epoch)

    def _commit(self, epoch: int, best, ranked, rows: List[Dict], staged: Dict[str, str], prune: List[str]) -> None:
        """The commit point: the index naming this save's files is written to a temporary, fsynced, renamed onto
        ``checkpoints.json``, and the folder fsynced."""
        index = {"format": 2, "epoch": epoch, "ranked": [list(r) for r in ranked], "best": list(best) if best else None,
                 "staged": staged, "prune": prune, "rows": rows, "paths": "relative to this folder"}
        tmp = write_temp(self.index_path, json.dumps(index, indent=1))
        try:
            _crash_point("staged-index", epoch)
            os.replace(tmp, self.index_path)
        except BaseException:
            remove_quietly(tmp)
            raise
        fsync_dir(self.out_dir)

"""Claiming a run folder: one folder per run, even when two runs start together with the same ``--experiment``.

A run holds ``<run>/run.lock`` for its whole life: the file is created (or opened) and locked with an exclusive,
non-blocking ``flock`` before any set-up, and it records ``{"pid", "host", "started"}``. The kernel drops the lock
when the process ends in any way (SIGKILL and the OOM killer included), so a lock whose holder is gone is detected
and taken over with a log line; a lock that another live process holds never is. As a second guard (a file system
without ``flock``, a lock written by a process of this host that is still running) a recorded pid that is alive on
this host, and did not mark its lock released, also counts as live. Only rank 0 claims; the other ranks are told
the folder. The lock file is never deleted (deleting a locked file would let a third process lock a new file of
the same name): a run that ends marks it ``"released"``. The one exception is :meth:`RunLock.discard`: a run whose
set-up failed (bad data, bad model) removes the folder it created itself while it holds nothing but the lock (and
the run's own ``args.yaml``), so a failed start leaves no empty run folder; a claimer that opened the lock file
just before it was removed sees it unlinked after locking and moves on (:func:`try_lock`).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from typing import Callable, Dict, Optional

try:
    import fcntl
except ImportError:  # Windows: the recorded pid is the only guard
    fcntl = None

_logger = logging.getLogger("ddf.run_folder")

LOCK_NAME = "run.lock"

__all__ = ["LOCK_NAME", "RunFolderBusy", "RunLock", "try_lock", "claim_existing", "claim_new"]


class RunFolderBusy(RuntimeError):
    """The run folder is held by another live run."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else
    return True


def _read_holder(fd: int) -> Dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        raw += chunk
    try:
        holder = json.loads(raw.decode() or "{}")
        return holder if isinstance(holder, dict) else {}
    except (UnicodeDecodeError, ValueError):
        return {"unreadable": True} if raw else {}


def _holder_alive(holder: Dict) -> bool:
    """A recorded holder that is still running on this host (the guard where ``flock`` is not available)."""
    if holder.get("released") or holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    return isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid)


def _write_holder(fd: int, holder: Dict) -> None:
    data = json.dumps(holder, sort_keys=True).encode()
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, data)
    os.fsync(fd)


class RunLock:
    """The lock a run holds on its folder; :meth:`release` when the run ends (the kernel does when it dies)."""

    def __init__(self, folder: str, fd: int, created: bool = False):
        self.folder, self.path, self._fd = folder, os.path.join(folder, LOCK_NAME), fd
        self.created = created  # this claim made the folder (it did not exist before)

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def release(self) -> None:
        if self._fd < 0:
            return
        try:
            holder = _read_holder(self._fd)
            holder.update(released=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            _write_holder(self._fd, holder)
        except OSError:
            pass
        finally:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = -1


    def discard(self, own_files=("args.yaml",)) -> bool:
        """After a failed set-up: remove the folder when this claim created it and it holds nothing but the lock
        and ``own_files``; release the lock either way. True when the folder was removed. The files go while the
        lock is still held, the lock file last, and ``rmdir`` keeps the folder when another claim wrote into it."""
        if self._fd < 0:
            return False
        try:
            names = set(os.listdir(self.folder))
            if not self.created or not names <= {LOCK_NAME, *own_files}:
                return False
            for name in sorted(names - {LOCK_NAME}) + [LOCK_NAME]:
                os.unlink(os.path.join(self.folder, name))
            os.rmdir(self.folder)
            return True
        except OSError:
            return False
        finally:
            if os.path.exists(self.path):
                self.release()
            elif self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _flock(fd: int) -> bool:
    """True when this process now holds the exclusive lock; False when another process holds it."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        _logger.warning("cannot flock %s (%s); only the recorded pid guards this run folder", fd, e)
        return True


def try_lock(folder: str) -> Optional[RunLock]:
    """Lock ``folder`` (created if needed) for this process, or None when a live run holds it. A lock left by a
    process that is gone is taken over, with a log line naming it."""
    created = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        if not _flock(fd) or os.fstat(fd).st_nlink == 0:  # held, or removed by a discard since we opened it
            os.close(fd)
            return None
        holder = _read_holder(fd)
        if _holder_alive(holder):
            os.close(fd)
            return None
        if holder and not holder.get("released"):
            _logger.warning("%s: stale lock of pid %s on %s (started %s), whose process is gone; taking it over",
                            path, holder.get("pid"), holder.get("host"), holder.get("started"))
        _write_holder(fd, {"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    except BaseException:
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
        raise
    return RunLock(folder, fd, created)


def claim_existing(folder: str) -> RunLock:
    """Lock a run folder that a resume continues in place; :class:`RunFolderBusy` when a live run holds it."""
    lock = try_lock(folder)
    if lock is None:
        raise RunFolderBusy(f"run folder {folder} is in use by another running train.py ({LOCK_NAME} is held); "
                            f"wait for it to end, or resume into a new run folder with --experiment")
    return lock


def claim_new(base: str, holds_run: Callable[[str], bool]) -> RunLock:
    """Claim ``base``, else the first free ``base-1``, ``base-2``...: a folder is free when no live run holds its
    lock and it holds no earlier run (``holds_run``; suffixed folders must also be empty but for a lock). The
    check is repeated after locking, so a run that claimed and wrote the folder meanwhile is never shared."""
    n = 0
    while True:
        folder = base if n == 0 else f"{base}-{n}"
        n += 1
        if _taken(folder, holds_run, strict=folder != base):
            continue
        lock = try_lock(folder)
        if lock is None:
            continue
        if _taken(folder, holds_run, strict=folder != base):
            lock.release()
            continue
        if folder != base:
            _logger.warning("%s holds an earlier run or is in use; this run writes to %s instead (use --resume to "
                            "continue it)", base, folder)
        return lock


def _taken(folder: str, holds_run: Callable[[str], bool], strict: bool) -> bool:
    if holds_run(folder):
        return True
    if strict and os.path.isdir(folder):
        return any(name != LOCK_NAME for name in os.listdir(folder))
    return os.path.exists(folder) and not os.path.isdir(folder)

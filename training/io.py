"""The one atomic file writer, and checks of output paths done before a script starts its work."""
from __future__ import annotations

import os
import tempfile
from typing import Callable, Union

Content = Union[str, bytes, Callable[[str], None]]


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, content: Content) -> str:
    """Write ``content`` to ``path`` so that readers see either the old file or the complete new one.

    ``content`` is text, bytes, or a function that writes the file at the temporary path it is given. The temporary
    file lives in the same folder (so ``os.replace`` is atomic), is fsynced before the replace, and is removed when
    anything fails; the folder entry is fsynced after. Returns ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        if callable(content):
            os.close(fd)
            fd = -1
            content(tmp)
        else:
            with os.fdopen(fd, "wb") as f:
                fd = -1
                f.write(content.encode() if isinstance(content, str) else content)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)
    return path


def check_output_file(path: str, option: str, suffixes=None) -> str:
    """Check, before any work, that ``path`` can be written: not a folder, the right suffix, and a parent folder
    that exists or can be created and is writable. Raises ValueError naming ``option``. Returns the absolute path."""
    if not path:
        raise ValueError(f"{option}: empty path")
    full = os.path.abspath(path)
    if suffixes and not full.lower().endswith(tuple(suffixes)):
        raise ValueError(f"{option} must end in {' or '.join(suffixes)}, got {path!r}")
    if os.path.isdir(full):
        raise ValueError(f"{option} {path!r} is a folder; give a file name")
    check_output_dir(os.path.dirname(full), option)
    return full


def check_output_dir(folder: str, option: str) -> str:
    """Create ``folder`` if needed and check it is a writable folder; ValueError naming ``option`` otherwise."""
    full = os.path.abspath(folder)
    try:
        os.makedirs(full, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"{option}: {full} is not a folder (a file is in the way)") from None
    except OSError as e:
        raise ValueError(f"{option}: cannot create folder {full}: {e.strerror or e}") from None
    if not os.access(full, os.W_OK | os.X_OK):
        raise ValueError(f"{option}: folder {full} is not writable")
    return full

"""The one atomic file writer, and checks of output paths done before a script starts its work."""
from __future__ import annotations

import os
import tempfile
from typing import Callable, Tuple, Union

Content = Union[str, bytes, Callable[[str], None]]
TMP_SUFFIX = ".tmp"  # temporary files are ``.<name>.<random>.tmp`` in the target's folder


def fsync_dir(folder: str) -> None:
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


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


def file_mode_for(path: str) -> int:
    """The mode a file written at ``path`` gets: the existing file's (a results file keeps its 0644), else what
    ``open()`` would give under the process umask (0666 & ~umask), not mkstemp's 0600."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def fsync_file(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_temp(path: str, content: Content) -> str:
    """Write ``content`` to a new temporary file next to ``path`` (``.<name>.<random>.tmp``, so ``os.replace`` onto
    ``path`` is atomic), fsynced, with the mode ``path`` will have (:func:`file_mode_for`); return its path.

    ``content`` is text, bytes, or a function that writes the file at the temporary path it is given. The temporary
    file is removed when anything fails."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    mode = file_mode_for(path)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=TMP_SUFFIX, dir=folder)
    try:
        os.chmod(tmp, mode)
        if callable(content):
            os.close(fd)
            fd = -1
            content(tmp)
        else:
            with os.fdopen(fd, "wb") as f:
                fd = -1
                f.write(content.encode() if isinstance(content, str) else content)
        fsync_file(tmp)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        remove_quietly(tmp)
        raise
    return tmp


def is_temp_of(name: str, target: str) -> bool:
    """True when file name ``name`` is a temporary file :func:`write_temp` made for the file named ``target``."""
    return name.startswith("." + target + ".") and name.endswith(TMP_SUFFIX) and "/" not in name


def remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def atomic_write(path: str, content: Content) -> str:
    """Write ``content`` to ``path`` so that readers see either the old file or the complete new one.

    :func:`write_temp`, then ``os.replace`` onto ``path`` (the temporary file is removed when that fails) and an fsync
    of the folder entry. The file's mode is the replaced file's, or follows the umask (:func:`file_mode_for`).
    Returns ``path``."""
    tmp = write_temp(path, content)
    try:
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))
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
    try:  # access() says yes to root everywhere (e.g. /proc): create and remove a file to be sure
        fd, probe = tempfile.mkstemp(prefix=".probe.", suffix=TMP_SUFFIX, dir=full)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{option}: cannot create files in {full}: {e.strerror or e}") from None
    return full


def claim_output_file(path: str, option: str, suffixes=None) -> Tuple[str, bool]:
    """:func:`check_output_file`, then create the file now, empty, so a path that cannot be written fails before
    the work (ValueError naming ``option``). An existing file is left as it is (checked to be a writable regular
    file). Returns (absolute path, created); give both to :func:`discard_if_empty` when the work ends."""
    full = check_output_file(path, option, suffixes)
    try:
        os.close(os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        return full, True
    except FileExistsError:
        pass
    except OSError as e:
        raise ValueError(f"{option}: cannot create {full}: {e.strerror or e}") from None
    if not os.path.isfile(full):
        raise ValueError(f"{option}: {full} exists and is not a regular file")
    if not os.access(full, os.W_OK):
        raise ValueError(f"{option}: {full} exists and is not writable")
    return full, False


def discard_if_empty(path: str, created: bool) -> None:
    """Remove a file :func:`claim_output_file` created when nothing was written to it."""
    try:
        if created and os.path.isfile(path) and os.path.getsize(path) == 0:
            os.unlink(path)
    except OSError:
        pass

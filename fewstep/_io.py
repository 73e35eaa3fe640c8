"""Atomic file output: write to a temporary file in the target directory, then rename."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "check_writable", "check_creatable_dir", "first_missing_dir"]


def check_writable(path: str | os.PathLike, arg: str = "path") -> Path:
    """Fail early (``ValueError`` naming ``arg``) if ``path`` cannot be created (for a link to a regular file: if the
    file it points to cannot be replaced, see :func:`atomic_write`)."""
    if not str(path).strip():
        raise ValueError(f"`{arg}` must be a file path, got an empty string")
    p = Path(path)
    _check_replaceable(p, arg)  # a directory, device, FIFO or broken link at the path
    # a link to a regular file is written through (atomic_write): its target's directory gets the new file
    parent = Path(os.path.realpath(p)).parent if p.is_symlink() else p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"`{arg}` {str(p)!r}: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"`{arg}` {str(p)!r}: directory {str(parent)!r} is not writable")
    _probe_create(parent, p, arg)
    return p


def _check_replaceable(path: Path, arg: str) -> None:
    """An existing ``path`` must be a regular file (or a link to one): the atomic rename would replace a device,
    FIFO or socket with a regular file (``--state /dev/null`` run as root replaced the machine's /dev/null)."""
    if path.is_dir():
        raise ValueError(f"`{arg}` {str(path)!r} is a directory; give a file name")
    if (path.exists() or path.is_symlink()) and not path.is_file():
        raise ValueError(f"`{arg}` {str(path)!r} exists and is not a regular file (a device, FIFO, socket or broken "
                         "link); give the path of a regular file")


def _probe_create(directory: Path, path: Path, arg: str) -> None:
    """Create and remove a file in ``directory`` (``os.access`` says yes to root everywhere: /proc, read-only
    mounts), or a ``ValueError`` naming ``arg`` and ``path``."""
    try:
        with tempfile.NamedTemporaryFile(prefix=".fewstep-probe.", dir=directory):
            pass
    except OSError as exc:
        raise ValueError(f"`{arg}` {str(path)!r}: cannot create files in {str(directory)!r} ({exc.strerror})") from None


def check_creatable_dir(path: str | os.PathLike, arg: str = "path") -> Path:
    """Fail early (``ValueError`` naming ``arg``) if directory ``path`` neither exists as a directory nor can be
    created where it would go (its nearest existing parent must accept new files); creates nothing. An empty (or
    blank) ``path`` is refused: ``Path("")`` is the current directory, where the files would land unasked."""
    if not str(path).strip():
        raise ValueError(f"`{arg}` must be a directory path, got an empty string")
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"`{arg}` {str(p)!r} exists and is not a directory")
    parent = p
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"`{arg}` {str(p)!r}: {str(parent)!r} is not a directory")
    _probe_create(parent, p, arg)
    return p


def _new_file_mode(directory: Path) -> int:
    """The permission bits a file created now with mode 0666 gets (``0666 & ~umask``), read without changing the
    process umask: ``os.umask`` can only be read by setting it, and another thread creating a file in between got
    mode 0666 whatever the umask (a web server's private files world-writable). Linux: ``/proc/self/status``;
    elsewhere the mode of a probe file created in ``directory``."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    fd, probe = tempfile.mkstemp(prefix=".fewstep-mode.", dir=directory)
    os.close(fd)
    try:
        os.unlink(probe)
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        try:
            return os.fstat(fd).st_mode & 0o777
        finally:
            os.close(fd)
    finally:
        if os.path.exists(probe):
            os.unlink(probe)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``; on any error no file is left behind.

    The file gets the usual permissions (``0o666`` minus the umask), not ``mkstemp``'s private ``0o600``. A ``path``
    that is a symbolic link to a regular file is written through: the file it points to is replaced (the temporary
    file is made in that file's directory) and the link is kept. An ``OSError`` while writing (the writer's,
    safetensors' I/O errors included, e.g. a full disk) is raised again as an ``OSError`` whose message names
    ``path``; the writer's other errors pass through unchanged.
    """
    target = Path(path)
    _check_replaceable(target, "path")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot write {str(target)!r}: directory {str(parent)!r} does not exist")
    real = Path(os.path.realpath(target))  # a link: write the file it points to, keep the link
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{real.name}.", suffix=".tmp", dir=real.parent)
    except OSError as exc:
        raise _write_error(target, exc) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, _new_file_mode(real.parent))  # mkstemp's 0600 -> what open() would have given
        os.replace(tmp_path, real)
    except Exception as exc:
        if isinstance(exc, OSError) or _is_safetensors_error(exc):
            raise _write_error(target, exc) from None
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return target


def _is_safetensors_error(exc: BaseException) -> bool:
    """Whether ``exc`` is safetensors' own error type (raised for the I/O errors of ``save_file``), which is no
    ``OSError``."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # safetensors not installed: none of its errors can occur
        return False
    return isinstance(exc, SafetensorError)


def _write_error(target: Path, exc: BaseException) -> OSError:
    """An ``OSError`` saying that ``target`` could not be written and why: the OS error's text (and number), also
    out of safetensors' ``"... I/O error: No space left on device (os error 28)"``."""
    if isinstance(exc, OSError):
        code, reason = exc.errno, exc.strerror or str(exc)
    else:
        found = re.search(r"(?:I/O error: )?([^:]*?) \(os error (\d+)\)", str(exc))
        code, reason = (int(found.group(2)), found.group(1)) if found else (None, str(exc))
    message = f"cannot write {str(target)!r}: {reason}"
    return OSError(code, message) if code is not None else OSError(message)


def first_missing_dir(path: str | os.PathLike) -> Path | None:
    """The topmost folder of ``path`` that does not exist yet (what ``mkdir(parents=True)`` would create: the one to
    remove again when the work it was made for fails), or ``None`` when ``path`` exists."""
    top, p = None, Path(path).absolute()
    while not p.exists() and p != p.parent:
        top, p = p, p.parent
    return top

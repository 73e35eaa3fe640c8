"""Atomic file output: write to a temporary file in the target directory, then rename."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "check_writable", "check_creatable_dir"]


def check_writable(path: str | os.PathLike, arg: str = "path") -> Path:
    """Fail early (``ValueError`` naming ``arg``) if ``path`` cannot be created."""
    if not str(path).strip():
        raise ValueError(f"`{arg}` must be a file path, got an empty string")
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    _check_replaceable(p, arg)  # a directory, device, FIFO or broken link at the path
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
    created where it would go (its nearest existing parent must accept new files); creates nothing."""
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


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``; on any error no file is left behind.

    The file gets the usual permissions (``0o666`` minus the umask), not ``mkstemp``'s private ``0o600``.
    """
    target = Path(path)
    _check_replaceable(target, "path")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot write {str(target)!r}: directory {str(parent)!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent or ".")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return target

"""Atomic output files: complete or absent, with ordinary permissions."""

from __future__ import annotations

import os
import stat

import pytest

from fewstep._io import atomic_write


def test_atomic_write_gives_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "out.txt", lambda p: p.write_text("ok"))
    finally:
        os.umask(umask)
    assert path.read_text() == "ok"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    def fail(p):
        p.write_text("partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_write(tmp_path / "out.txt", fail)
    assert list(tmp_path.iterdir()) == []

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


def test_an_existing_special_file_is_never_replaced(tmp_path):
    """Found by probing: `--state /dev/null` run as root replaced the machine's /dev/null by a regular file (the
    atomic rename replaces whatever the path names). A FIFO stands in for the device here."""
    import os

    from fewstep._io import atomic_write, check_writable

    fifo = tmp_path / "state.fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="`--state` .*state.fifo' exists and is not a regular file"):
        check_writable(fifo, "--state")
    with pytest.raises(ValueError, match="exists and is not a regular file"):
        atomic_write(fifo, lambda p: p.write_text("x"))
    assert fifo.is_fifo() and [p.name for p in tmp_path.iterdir()] == ["state.fifo"]
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "missing")
    with pytest.raises(ValueError, match="broken link"):
        check_writable(link, "--out")


def test_cli_refuses_a_special_file_as_output(tmp_path, capsys):
    import os

    from fewstep.cli import main

    fifo = tmp_path / "f.json"
    os.mkfifo(fifo)
    argv = ["bench", "--model", "analytic", "--steps", "3", "--samplers", "unipc", "--num-samples", "50",
            "--json", str(fifo), "--quiet"]
    assert main(argv) == 2
    assert "exists and is not a regular file" in capsys.readouterr().err and fifo.is_fifo()


def test_atomic_write_names_a_directory_target_and_a_missing_parent(tmp_path):
    with pytest.raises(ValueError, match="is a directory; give a file name"):
        atomic_write(tmp_path, lambda p: p.write_text("x"))
    with pytest.raises(FileNotFoundError, match="directory .*missing' does not exist"):
        atomic_write(tmp_path / "missing" / "f.json", lambda p: p.write_text("x"))

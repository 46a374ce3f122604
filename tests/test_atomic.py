"""``harness.atomic``: the one helper every file the harness replaces goes through."""

from __future__ import annotations

import os
import threading

import pytest

from harness.atomic import atomic_write, write_text


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary_one(tmp_path):
    target = tmp_path / "summary.csv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError, match="midway"):
        with atomic_write(target) as fh:
            fh.write("half of the new")
            raise RuntimeError("midway")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.csv"]


def test_a_write_replaces_the_file_whole_makes_its_directory_and_follows_the_umask(tmp_path):
    target = tmp_path / "a" / "b" / "last.pt"
    previous = os.umask(0o022)
    try:
        with atomic_write(target, "wb") as fh:
            fh.write(b"\x00\x01")
    finally:
        os.umask(previous)
    assert target.read_bytes() == b"\x00\x01"
    assert target.stat().st_mode & 0o777 == 0o644  # as open() makes it, not mkstemp's 0600
    assert write_text(target.with_name("told"), "3") == target.with_name("told")
    assert target.with_name("told").read_text() == "3"
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.pt", "told"]


def test_writers_of_one_file_at_once_never_share_a_temporary_file(tmp_path):
    target = tmp_path / "frames.npz"
    inside, go = threading.Barrier(5), threading.Event()

    def write(i: int) -> None:
        with atomic_write(target, "wb", sync=False) as fh:
            fh.write(bytes([i]) * 10_000)
            inside.wait()  # all four temporary files exist at once
            go.wait()

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    inside.wait(timeout=10)
    assert len([p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]) == 4
    go.set()
    for t in threads:
        t.join()
    data = target.read_bytes()
    assert len(data) == 10_000 and len(set(data)) == 1  # one writer's file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["frames.npz"]


def test_only_a_fresh_write_is_offered(tmp_path):
    with pytest.raises(ValueError, match="mode 'w' or 'wb', not 'a'"):
        with atomic_write(tmp_path / "x", "a"):
            pass

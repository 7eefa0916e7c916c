"""Atomic writes."""

import pytest

from mobilenetv2.errors import WriteError
from mobilenetv2.files import atomic_write, atomic_write_bytes


def test_atomic_write_never_destroys_the_last_good_file(tmp_path):
    target = tmp_path / "last.pt"
    target.write_bytes(b"good")

    def crash(handle):
        handle.write(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, crash)
    assert target.read_bytes() == b"good"
    assert list(tmp_path.iterdir()) == [target]


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs (root only: skipped elsewhere), unmounted afterwards."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk, leave: int) -> None:
    """Fill `disk` up to `leave` bytes free."""
    import os

    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    (disk / "filler").write_bytes(b"\0" * max(free - leave, 0))


def test_a_full_disk_keeps_the_previous_file_and_leaves_no_temp(small_disk):
    target = small_disk / "weights.bin"
    atomic_write_bytes(target, b"good" * 1000)
    fill(small_disk, leave=64 << 10)
    with pytest.raises(WriteError, match="could not write .*weights.bin: No space left on device; the previous"):
        atomic_write_bytes(target, b"x" * (1 << 20))
    assert target.read_bytes() == b"good" * 1000
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "weights.bin"]


def test_training_on_a_full_disk_ends_in_one_line_with_the_last_checkpoint_intact(small_disk, dataset, capsys):
    from conftest import TINY, records, train
    from mobilenetv2.checkpoint import read_torch_file

    run = small_disk / "run"
    assert train(dataset, run, "--epochs", "1", "--amp", "off") == 0
    before = (run / "checkpoints" / "last.pt").read_bytes()
    fill(small_disk, leave=32 << 10)
    capsys.readouterr()
    assert train(dataset, run, "--epochs", "2", "--amp", "off", "--resume", "auto") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device; the previous file is intact" in err[0], err
    assert (run / "checkpoints" / "last.pt").read_bytes() == before
    assert read_torch_file(run / "checkpoints" / "last.pt")["epoch"] == 1
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert len(records(run, "epoch")) >= 1 and TINY


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_files_get_the_permissions_the_umask_gives(tmp_path, umask):
    import os

    previous = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a.pt", b"data")
        plain = tmp_path / "plain"
        plain.write_bytes(b"data")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.pt").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o666 & ~umask

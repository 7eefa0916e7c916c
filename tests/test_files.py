"""Atomic writes."""

import pytest

from mobilenetv2.files import atomic_write


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

"""Atomic file writes: a temp file in the target's folder, flushed and fsynced, then renamed over the target.

Every writer of checkpoints, caches and exports goes through here, so a crash mid-write never leaves a half file
under the real name and never destroys the last good one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Call `write(file)` on a temp file beside `path`, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def temp_path_beside(path: str | os.PathLike) -> Path:
    """A fresh, unused name in `path`'s folder, for writers that insist on a file name of their own (ONNX,
    TorchScript); the caller renames it over `path` with `os.replace` once it is complete and checked."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def written_with(marker: str | os.PathLike, key: str, wanted) -> bool:
    """Whether the JSON `marker` a writer left says it wrote with `wanted` under `key` (a folder to reuse as it is)."""
    try:
        return json.loads(Path(marker).read_text()).get(key) == wanted
    except (OSError, json.JSONDecodeError, AttributeError):
        return False

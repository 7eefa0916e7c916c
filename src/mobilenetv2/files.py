"""Atomic file writes: a temp file in the target's folder, flushed and fsynced, then renamed over the target.

Every writer of checkpoints, caches and exports goes through here, so a crash mid-write never leaves a half file
under the real name and never destroys the last good one. A write the disk refuses (full, read-only, over quota)
removes its temp file and ends in one `WriteError` line. Files come out with the permissions the user's umask
gives a new file (not the 0600 of a private temp file), so a team sharing a run folder can read them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from mobilenetv2.errors import UserError, WriteError, first_line


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Call `write(file)` on a temp file beside `path`, fsync, then rename over `path`."""
    path = Path(path)
    tmp = temp_path_beside(path)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _sync_folder(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(path, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_error(path: Path, exc: OSError) -> WriteError:
    """One line for a write the system refused, saying what became of the file that was there."""
    kept = "; the previous file is intact" if path.exists() else ""
    return WriteError(f"could not write {path}: {exc.strerror or exc}{kept}")


def _sync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (a power cut after it keeps the new name)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def temp_path_beside(path: str | os.PathLike) -> Path:
    """A fresh, unused name in `path`'s folder, for writers that insist on a file name of their own (ONNX,
    TorchScript); the caller renames it over `path` with `os.replace` once it is complete and checked."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # what open() would give a new file
    finally:
        os.close(fd)
    return Path(tmp)


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files our writers leave when a process is killed mid-write (`.NAME.XXXX.tmp`); the
    caller must be the folder's only writer. Returns what was removed."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for path in folder.glob(".*.tmp"):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def written_with(marker: str | os.PathLike, key: str, wanted) -> bool:
    """Whether the JSON `marker` a writer left says it wrote with `wanted` under `key` (a folder to reuse as it is)."""
    try:
        return json.loads(Path(marker).read_text()).get(key) == wanted
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


RECORD_BYTES = 1 << 20  # a kept-timings record larger than this is not ours: read as empty


def read_record(path: str | os.PathLike | None) -> dict:
    """A JSON record of dicts kept by a cache (timings per question); empty when absent, too large or damaged."""
    try:
        if path is None or Path(path).stat().st_size > RECORD_BYTES:
            return {}
        known = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in known.items() if isinstance(v, dict)} if isinstance(known, dict) else {}


def keep_record(path: str | os.PathLike | None, known: dict) -> None:
    """Write a record for `read_record`; a folder that refuses is no error (the question is asked again)."""
    if path is None:
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(known, indent=1).encode())
    except (OSError, WriteError):
        pass


def file_sha256(path: str | os.PathLike, salt: bytes = b"") -> str:
    """The sha256 (hex) of `salt` followed by a file's bytes, read a megabyte at a time."""
    digest = hashlib.sha256(salt)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path} is not valid YAML: {first_line(exc)}") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def write_yaml(values: dict[str, Any], path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(values, sort_keys=False))

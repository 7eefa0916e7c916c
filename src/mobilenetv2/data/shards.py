"""Tar shards in the WebDataset layout, for datasets read from shared storage or a bucket: each sample is
`KEY.jpg` (or `.png`, `.webp`: the file's own bytes, never re-encoded) beside `KEY.cls` (the class index as text),
and `_info.json` describes the splits as timm's WebDataset reader expects (sample counts, shard names and lengths)
plus the class names.

Writing is deterministic: samples are shuffled once with a fixed seed (so a shard mixes classes, as a shuffle buffer
needs), tar headers carry no time, owner or user name, and the same tree gives the same bytes. Each shard is written
under a temp name and renamed when complete; the manifest is written last, so an interrupted run leaves no manifest
and a rerun writes the same shards again. Files that do not decode are skipped, as training skips them, and counted.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mobilenetv2.data.folders import DECODE_ERRORS, class_folders, find_val_folder, image_folder, open_image
from mobilenetv2.errors import DataError, UserError
from mobilenetv2.files import atomic_write_bytes

MANIFEST = "_info.json"
SPLITS = {"train": "train", "val": "validation"}  # our folder -> the split name timm reads ("validation")
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # PIL format -> the member's extension
SHUFFLE_SEED = 0
READ_BLOCK = 512  # files read (and checked) at once


@dataclass
class ShardReport:
    shards: dict[str, list[str]]
    samples: dict[str, int]
    skipped: dict[str, list[str]]


def parse_size(text: str) -> int:
    """'256MB', '1GB', '500kB' or a byte count -> bytes (powers of 1000, as the shard tools count)."""
    units = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    lowered = text.strip().lower()
    for unit, factor in units.items():
        if lowered.endswith(unit):
            number = lowered[: -len(unit)]
            break
    else:
        number, factor = lowered, 1
    try:
        value = int(float(number) * factor)
    except ValueError:
        raise UserError(f"`shard_size` must be a size such as 256MB, got {text!r}") from None
    if value < 64 * 10**3:
        raise UserError(f"`shard_size` must be at least 64kB, got {text!r}")
    return value


def _checked(path: str) -> tuple[bytes, str] | None:
    """The file's bytes and the extension its format takes in a shard, or None when it does not decode. The bytes
    are read once and decoded from memory; a JPEG is decoded at 1/8 scale (libjpeg still reads every coefficient,
    so a cut or corrupt file fails as it would at full size, in about a third of the time)."""
    try:
        data = Path(path).read_bytes()
        with open_image(io.BytesIO(data)) as image:
            fmt = image.format
            if fmt == "JPEG":
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except (*DECODE_ERRORS, OSError):
        return None
    return data, EXTENSIONS.get(fmt or "", (fmt or "bin").lower())


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))


def _write_shard(path: Path, samples: list[tuple[str, bytes, str, int]]) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, data, extension, label in samples:
            _member(tar, f"{key}.{extension}", data)
            _member(tar, f"{key}.cls", str(label).encode())
    atomic_write_bytes(path, buffer.getvalue())


def write_shards(source: str | os.PathLike, output: str | os.PathLike, shard_size: int = 256 * 10**6,
                 workers: int = 4, prefix: str = "") -> ShardReport:
    """Shard SOURCE/train and SOURCE/val (or validation_preprocess) into OUTPUT; returns what was written."""
    source, output = Path(source), Path(output)
    train = source / "train"
    if not train.is_dir():
        raise DataError(f"{source} has no train/ folder (expected {source}/train/<class>/<image>)")
    classes = class_folders(train)
    folders = {"train": train}
    val = find_val_folder(source)
    if val is not None:
        folders["val"] = val
    prefix = prefix or source.name
    report = ShardReport({}, {}, {})
    info = {"name": prefix, "class_names": classes, "splits": {}}
    output.mkdir(parents=True, exist_ok=True)
    for folder_name, folder in folders.items():
        split = SPLITS[folder_name]
        samples = image_folder(folder, None, classes).samples
        order = np.random.default_rng(SHUFFLE_SEED).permutation(len(samples))
        shards, lengths, current, size, skipped = [], [], [], 0, []
        with ThreadPoolExecutor(max(workers, 1)) as pool:
            for start in range(0, len(order), READ_BLOCK):  # a block of files in memory at a time
                block = order[start:start + READ_BLOCK]
                for position, index, result in zip(range(start, start + len(block)), block,
                                                   pool.map(_checked, (samples[i][0] for i in block))):
                    path, label = samples[index]
                    if result is None:
                        skipped.append(path)
                        continue
                    data, extension = result
                    current.append((f"{split}{position:08d}", data, extension, label))
                    size += len(data) + 2048  # two tar headers and padding
                    if size >= shard_size:
                        shards.append(f"{prefix}-{split}-{len(shards):06d}.tar")
                        _write_shard(output / shards[-1], current)
                        lengths.append(len(current))
                        current, size = [], 0
        if current:
            shards.append(f"{prefix}-{split}-{len(shards):06d}.tar")
            _write_shard(output / shards[-1], current)
            lengths.append(len(current))
        unread = set(skipped)
        counts = np.bincount([label for path, label in samples if path not in unread], minlength=len(classes))
        info["splits"][split] = {"name": split, "num_samples": sum(lengths), "filenames": shards,
                                 "shard_lengths": lengths, "skipped": len(skipped), "class_counts": counts.tolist()}
        report.shards[split], report.samples[split], report.skipped[split] = shards, sum(lengths), skipped
    atomic_write_bytes(output / MANIFEST, json.dumps(info, indent=1).encode())
    _remove_strays(output, {name for names in report.shards.values() for name in names}, prefix)
    return report


def _remove_strays(output: Path, written: set[str], prefix: str) -> None:
    """Shards of this prefix that an earlier run (with another shard size) left and the manifest no longer names."""
    for path in output.glob(f"{prefix}-*.tar"):
        if path.name not in written:
            path.unlink()

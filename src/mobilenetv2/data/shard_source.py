"""Where shards are and what they hold: a shard source (`--data`) resolved against its manifest, URLs opened through
webdataset's openers (local files, `pipe:` commands, `http(s)://` through curl) or fsspec (`s3://`, `gs://`, any
other scheme an installed fsspec filesystem serves), and the samples of one shard read as a stream.

A source is one of:
- a folder or URL holding `_info.json` (the manifest `data shard` writes), or the manifest's own path or URL: the
  train and validation splits are the manifest's, their shards beside it;
- a brace pattern or list of shards (`DIR/imagenet-train-{000000..001023}.tar`, also inside a `pipe:` command or a
  URL): each shard is found in the manifest by its file name, which gives its split and sample count. The manifest is
  the one beside the first shard (for `pipe:`, beside the last word of the command that names a .tar), or
  `--shard-info`.

Every size read from a manifest or a shard is bounded; a shard's member larger than MAX_SAMPLE_BYTES is skipped
unread.
"""

from __future__ import annotations

import importlib
import json
import os
import posixpath
import tarfile
from dataclasses import dataclass
from urllib.parse import urlparse

from mobilenetv2.errors import DataError, UserError

MANIFEST = "_info.json"
MAX_MANIFEST_BYTES = 64 << 20
MAX_SAMPLE_BYTES = 64 << 20  # as the device backend's file limit
MAX_SAMPLES_PER_SHARD = 10**8
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
SPLITS = ("train", "validation")
READ_ERRORS = (OSError, tarfile.TarError, EOFError, ValueError)  # what a missing, cut or corrupt shard raises


@dataclass(frozen=True)
class ShardSet:
    """One split's shards: their URLs (or paths, or pipe: commands) and sample counts, in the manifest's order."""

    split: str
    urls: tuple[str, ...]
    lengths: tuple[int, ...]
    class_counts: tuple[int, ...] | None = None

    @property
    def num_samples(self) -> int:
        return sum(self.lengths)


@dataclass(frozen=True)
class ShardSplits:
    """A shard source's splits (either may be None) and the class names the labels index."""

    train: ShardSet | None
    val: ShardSet | None
    classes: list[str]
    source: str


def _webdataset():
    try:
        return importlib.import_module("webdataset.gopen"), importlib.import_module("braceexpand")
    except ImportError:
        raise UserError("reading shards from patterns, pipes or URLs uses webdataset: "
                        "pip install 'mobilenetv2[shards]'") from None


def is_shard_source(text: str) -> bool:
    """Whether `--data` names shards rather than an ImageFolder tree."""
    if not text:
        return False
    if _is_pattern(text) or "://" in text or text.endswith(MANIFEST):
        return True
    return os.path.isdir(text) and os.path.isfile(os.path.join(text, MANIFEST))


def _scheme(url: str) -> str:
    if url.startswith("pipe:"):
        return "pipe"
    scheme = urlparse(url).scheme
    return "" if len(scheme) <= 1 else scheme  # "C:" is a drive, not a scheme


def _local_path(url: str) -> str | None:
    """The file a plain path or file:// URL names; None for anything remote or a pipe."""
    scheme = _scheme(url)
    if scheme not in ("", "file"):
        return None
    return urlparse(url).path if scheme else url


def open_url(url: str):
    """A binary stream of `url`: a local file, a pipe: command's output, curl's download (http, https, sftp, ...)
    through webdataset, or any other scheme through fsspec."""
    scheme, path = _scheme(url), _local_path(url)
    if path is not None:
        return open(path, "rb", buffering=1 << 20)
    gopen, _ = _webdataset()
    if scheme in gopen.gopen_schemes:
        return gopen.gopen(url, "rb")
    try:
        import fsspec
    except ImportError:
        raise UserError(f"{scheme}:// shards are read through fsspec: pip install 'mobilenetv2[shards]' and the "
                        f"filesystem for {scheme} (s3fs for s3://, gcsfs for gs://)") from None
    try:
        return fsspec.open(url, "rb").open()
    except (ImportError, ValueError) as exc:  # no filesystem installed for this scheme
        raise UserError(f"cannot open {url}: {exc}") from None


def read_bounded(url: str, limit: int) -> bytes:
    stream = open_url(url)
    try:
        data = stream.read(limit + 1)
    finally:
        stream.close()
    if len(data) > limit:
        raise DataError(f"{url} is larger than {limit} bytes")
    return data


def _parent(url: str) -> str:
    if _scheme(url) in ("", "file"):
        return os.path.dirname(url) or "."
    return url.rsplit("/", 1)[0]


def _join(base: str, name: str) -> str:
    return os.path.join(base, name) if _scheme(base) in ("", "file") else base.rstrip("/") + "/" + name


def _named_shard(url: str) -> str:
    """The word of a pipe: command that names its .tar (the URL or path it reads), or `url` itself."""
    if not url.startswith("pipe:"):
        return url
    words = [word for word in url[5:].split() if ".tar" in word]
    if not words:
        raise DataError(f"cannot tell which shard {url!r} reads (no word naming a .tar); give --shard-info")
    return words[-1].strip("'\"")


def read_manifest(location: str) -> dict:
    """The manifest at `location`, checked: class names, and per split shard names without folders, with counts."""
    try:
        info = json.loads(read_bounded(location, MAX_MANIFEST_BYTES))
    except READ_ERRORS as exc:
        raise DataError(f"cannot read the shard manifest {location}: {exc}") from None
    names = info.get("class_names") if isinstance(info, dict) else None
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names) and len(set(names)) == len(names)):
        raise DataError(f"{location} has no class_names list (write shards with `mobilenetv2 data shard`)")
    splits = info.get("splits")
    if not isinstance(splits, dict) or not any(split in splits for split in SPLITS):
        raise DataError(f"{location} has neither a train nor a validation split")
    for split in SPLITS:
        entry = splits.get(split)
        if entry is None:
            continue
        files, lengths = entry.get("filenames"), entry.get("shard_lengths")
        good = (isinstance(files, list) and isinstance(lengths, list) and len(files) == len(lengths)
                and all(isinstance(f, str) and f and "/" not in f and "\\" not in f and f not in (".", "..") for f in files)
                and all(isinstance(n, int) and 0 <= n <= MAX_SAMPLES_PER_SHARD for n in lengths))
        if not good:
            raise DataError(f"{location}: split {split} needs filenames (plain names) and shard_lengths of one length")
    return info


def _counts(entry: dict, classes: int) -> tuple[int, ...] | None:
    counts = entry.get("class_counts")
    if isinstance(counts, list) and len(counts) == classes and all(isinstance(n, int) and n >= 0 for n in counts):
        return tuple(counts)
    return None


def _is_pattern(source: str) -> bool:
    return source.startswith("pipe:") or source.endswith(".tar") or ("{" in source and ".tar" in source)


def expand(pattern: str) -> list[str]:
    """A brace pattern (`a-{000..003}.tar`), also `::`-separated lists of them, as shard URLs."""
    _, braceexpand = _webdataset()
    return [url for part in pattern.split("::") for url in braceexpand.braceexpand(part)]


def find_shard_splits(source: str, manifest: str = "") -> ShardSplits:
    """The splits of a shard source (see the module's text), each shard's URL, split and sample count."""
    if _is_pattern(source):
        urls = expand(source)
        location = manifest or _join(_parent(_named_shard(urls[0])), MANIFEST)
    else:
        location = manifest or (source if source.endswith(".json") else _join(source, MANIFEST))
    info = read_manifest(location)
    classes = info["class_names"]
    entries = {split: info["splits"][split] for split in SPLITS if split in info["splits"]}
    if _is_pattern(source):
        where = {name: (split, length) for split, entry in entries.items()
                 for name, length in zip(entry["filenames"], entry["shard_lengths"])}
        chosen: dict[str, list[tuple[str, int]]] = {split: [] for split in entries}
        for url in urls:
            name = posixpath.basename(_named_shard(url))
            if name not in where:
                raise DataError(f"shard {name} is not in the manifest {location}")
            split, length = where[name]
            chosen[split].append((url, length))
        sets = {split: ShardSet(split, tuple(u for u, _ in pairs), tuple(n for _, n in pairs), None)
                for split, pairs in chosen.items() if pairs}
    else:
        base = _parent(location)
        sets = {split: ShardSet(split, tuple(_join(base, f) for f in entry["filenames"]), tuple(entry["shard_lengths"]),
                                _counts(entry, len(classes)))
                for split, entry in entries.items() if entry["filenames"]}
    return ShardSplits(sets.get("train"), sets.get("validation"), classes, source)


def check_local(shards: ShardSet) -> None:
    """A local shard that is missing ends the run before it starts (remote ones are found missing when read)."""
    for url in shards.urls:
        path = _local_path(url)
        if path is not None and not os.path.isfile(path):
            raise DataError(f"shard not found: {url} (or pass --skip-bad-shards)")


@dataclass
class Sample:
    url: str
    key: str
    image: bytes | None  # None: the sample has no image member, or one too large to read
    label: int | None  # None: no .cls member, or one that is not a class index
    problem: str = ""


def _sample(url: str, key: str, parts: dict, classes: int) -> Sample:
    image = next((parts[ext] for ext in IMAGE_EXTENSIONS if ext in parts), None)
    label, problem = None, ""
    try:
        label = int(parts.get("cls", b"").decode("ascii").strip())
        if not 0 <= label < classes:
            label, problem = None, f"label {label} is not a class index (0..{classes - 1})"
    except (UnicodeDecodeError, ValueError):
        problem = "no class label (.cls)"
    if image is None:
        problem = parts.get("__problem__", "no image member")
    return Sample(url, key, image if isinstance(image, bytes) else None, label, problem)


def _read_exactly(stream, size: int, what: str) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise tarfile.ReadError(f"the shard ends inside {what}")
    return data


def _skip(stream, size: int, what: str) -> None:
    while size > 0:
        size -= len(_read_exactly(stream, min(size, 1 << 20), what))


def _members(stream):
    """(name, data) of each regular file of a tar stream, data None for one over MAX_SAMPLE_BYTES (skipped unread).
    Headers are parsed by tarfile (ustar, GNU long names and pax paths); the bytes are read straight from the stream,
    a quarter of what tarfile's own stream mode costs per member."""
    long_name = None
    while True:
        header = stream.read(tarfile.BLOCKSIZE)
        if header == tarfile.NUL * tarfile.BLOCKSIZE:  # the end-of-archive block
            return
        if not header:  # every tar writer ends with that block: its absence is a shard cut between two members
            raise tarfile.ReadError("the shard ends without its end-of-archive block (cut short)")
        if len(header) != tarfile.BLOCKSIZE:
            raise tarfile.ReadError("the shard ends inside a tar header")
        info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        padded = info.size + (-info.size) % tarfile.BLOCKSIZE
        if info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE, tarfile.XGLTYPE):
            if info.size > MAX_MANIFEST_BYTES:
                raise tarfile.ReadError(f"a tar extension header of {info.size} bytes")
            data = _read_exactly(stream, info.size, "a tar header")
            _read_exactly(stream, padded - info.size, "a tar header")
            if info.type == tarfile.GNUTYPE_LONGNAME:
                long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            elif info.type == tarfile.XHDTYPE:
                long_name = _pax_path(data) or long_name
            continue
        name, long_name = long_name or info.name, None
        if not info.isreg():  # data follows only types tarfile does not know (as tarfile reads it)
            _skip(stream, padded if info.type not in tarfile.SUPPORTED_TYPES else 0, name)
            continue
        if info.size > MAX_SAMPLE_BYTES:
            _skip(stream, padded, name)
            yield name, None
            continue
        data = _read_exactly(stream, info.size, name)
        _read_exactly(stream, padded - info.size, name)  # the padding to the next block
        yield name, data


def _pax_path(data: bytes) -> str | None:
    """The `path` record of a pax extended header ("LENGTH path=VALUE\n" records)."""
    position = 0
    while position < len(data):
        length_text, _, _rest = data[position:position + 20].partition(b" ")
        if not length_text.isdigit() or int(length_text) <= 0:
            return None
        record = data[position:position + int(length_text)]
        key, _, value = record[len(length_text) + 1:].partition(b"=")
        if key == b"path":
            return value.rstrip(b"\n").decode("utf-8", "surrogateescape")
        position += int(length_text)
    return None


def read_shard(url: str, classes: int):
    """The samples of one shard, in order (members grouped by key, as WebDataset groups them). Raises one of
    READ_ERRORS when the shard cannot be opened or ends inside a member (samples before that were yielded)."""
    stream = open_url(url)
    try:
        key, parts = None, {}
        for path, data in _members(stream):
            name = posixpath.basename(path)
            member_key, _, extension = name.partition(".")
            if member_key != key:
                if key is not None:
                    yield _sample(url, key, parts, classes)
                key, parts = member_key, {}
            if data is None:
                parts["__problem__"] = f"{name} is larger than {MAX_SAMPLE_BYTES} bytes"
            else:
                parts[extension.lower()] = data
        if key is not None:
            yield _sample(url, key, parts, classes)
    finally:
        stream.close()

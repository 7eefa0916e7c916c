"""Shards read as training and eval streams (an IterableDataset under a DataLoader), with semantics a run relies on.

Training, per epoch: the shards are put in an order drawn from (run seed, epoch); the rank's loader has one reader
per worker (`streams`), and reader s of rank r (slot r x streams + s of ranks x streams) takes every slot-count-th
shard of that order from its slot on. Each reader passes its shards' samples through a shuffle buffer of
`shuffle_buffer` samples (its own generator, from the run seed, epoch, rank and reader) and drains it when its shards
end. Every rank makes the same number of steps: floor(samples / ranks / batch) (the seed drops the remainder), dealt
to the readers in turn (batch i from reader i mod streams, as the DataLoader takes its workers in turn); a reader
whose shards run out before its share reads on from the epoch's next shards, one whose share ends first leaves the
rest unread. So an epoch reads every sample once when the shards divide evenly among the readers, and otherwise up
to about one shard per reader twice or not at all (other shards each epoch).

Each sample's augmentation is drawn from its own seed (run seed, rank, epoch, reader, position in the reader's
stream), so the draws do not depend on which process runs them. Resuming at batch k of an epoch, each reader skips the
samples of its batches before k unread by the decoder (the tar is still read) and the workers take their readers
rotated by k, so the rest of the epoch is the same batches, bit for bit, as long as ranks and workers are the same
as when the run started.

Eval: reader slot g of G reads shards g, g + G, ... in the manifest's order, every sample once across ranks and
workers, the last batch of each reader partial.

A shard that cannot be opened or read to its end ends the run with one line naming it, unless `skip_bad` (then it
is skipped with a warning); a sample inside a shard that does not decode or has no label is skipped with a warning
naming the shard and the key, and counted, as unreadable files are.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from itertools import chain, count, islice
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mobilenetv2.data import augment
from mobilenetv2.data.folders import DECODE_ERRORS, open_image
from mobilenetv2.data.shard_source import READ_ERRORS, Sample, ShardSet, read_shard
from mobilenetv2.errors import DataError


@dataclass
class ShardFailure:
    """What a reader hands over instead of a batch when a shard fails (the consumer raises it in the main process,
    as one line)."""

    message: str


class _BadShard(Exception):
    pass


def steps_and_batch(samples: int, world_size: int, batch_size: int) -> tuple[int, int]:
    """Steps per epoch on every rank and the batch length: floor(samples / ranks / batch), or one smaller batch when
    a rank's share is less than a batch."""
    share = samples // world_size
    if share == 0:
        raise DataError(f"{samples} training samples cannot be shared among {world_size} ranks")
    return (share // batch_size, batch_size) if share >= batch_size else (1, share)


def sample_seed(*parts: int) -> int:
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)
    return int(state[0] ^ (state[1] << np.uint64(1))) % (1 << 63)


class _Item:
    """A sample -> what the loader hands over, or None with a warning naming the shard and key when it does not
    decode. `labels`: the model's index for each manifest class (None: the same)."""

    def __init__(self, labels: list[int] | None = None):
        self.labels = labels

    def label(self, sample: Sample) -> int:
        return self.labels[sample.label] if self.labels else sample.label

    @staticmethod
    def unreadable(sample: Sample, exc: Exception) -> None:
        warnings.warn(f"skipping unreadable sample {sample.key} in shard {sample.url}: {exc}", stacklevel=2)


class PilItem(_Item):
    """(image, label) through an ImagePipeline, decoded from the bytes no larger than it needs."""

    def __init__(self, pipeline, labels: list[int] | None = None):
        super().__init__(labels)
        self.pipeline = pipeline

    def __call__(self, sample: Sample):
        try:
            image = self.pipeline.finish(self.pipeline.decode(io.BytesIO(sample.image)))
        except DECODE_ERRORS as exc:
            return self.unreadable(sample, exc)
        return image, self.label(sample)


class EncodedItem(_Item):
    """(the sample's bytes as uint8 1-D, label, name) for the device backend: the header checked here, the decoding
    left to the device."""

    def __call__(self, sample: Sample):
        try:
            open_image(io.BytesIO(sample.image)).close()
        except DECODE_ERRORS as exc:
            return self.unreadable(sample, exc)
        data = torch.frombuffer(bytearray(sample.image), dtype=torch.uint8)
        return data, self.label(sample), f"{sample.url}:{sample.key}"


class ShardStream(IterableDataset):
    """Batches (through `collate`) of `item(sample)` for the shards of one split; see the module's text. Set `epoch`
    and `skip` (batches already done in the epoch) before a DataLoader starts its workers."""

    def __init__(self, shards: ShardSet, num_classes: int, item: Callable, collate: Callable, batch_size: int, *,
                 training: bool, steps: int = 0, streams: int = 1, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle_buffer: int = 0, skip_bad: bool = False):
        self.shards, self.num_classes, self.item, self.collate = shards, num_classes, item, collate
        self.batch_size, self.training, self.steps, self.streams = batch_size, training, steps, max(streams, 1)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle_buffer, self.skip_bad = shuffle_buffer, skip_bad
        self.epoch, self.skip = 0, 0

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.streams:
            raise DataError(f"the shard stream has {self.streams} readers but the loader {workers} workers")
        try:
            yield from (self._train(worker) if self.training else self._eval(worker))
        except _BadShard as exc:
            yield ShardFailure(str(exc))

    # ---------------------------------------------------------------- reading
    def _samples(self, url: str):
        """The readable samples of one shard; a failing shard raises _BadShard, or is skipped with a warning."""
        try:
            yield from read_shard(url, self.num_classes)
        except READ_ERRORS as exc:
            reason = _reason(exc)
            if not self.skip_bad:
                raise _BadShard(f"cannot read shard {url}: {reason} (pass --skip-bad-shards to go on without it)")
            warnings.warn(f"skipping unreadable shard {url}: {reason}", stacklevel=1)

    def _decode(self, sample: Sample, seed: int | None):
        if sample.image is None or sample.label is None:
            warnings.warn(f"skipping sample {sample.key} in shard {sample.url}: {sample.problem}", stacklevel=1)
            return None
        return self.item(sample) if seed is None else augment.seeded_call(seed, self.item, sample)

    def _batches(self, samples, seed_of: Callable[[int], int] | None, start: int = 0):
        batch = []
        for position, sample in enumerate(samples, start):
            batch.append(self._decode(sample, seed_of(position) if seed_of else None))
            if len(batch) == self.batch_size:
                yield self.collate(batch)
                batch = []
        if batch:
            yield self.collate(batch)

    # ---------------------------------------------------------------- training
    def _train(self, worker: int):
        stream = (worker + self.skip) % self.streams  # the reader whose batch comes next, first
        slots, slot = self.world_size * self.streams, self.rank * self.streams + stream
        mine = len(range(stream, self.steps, self.streams))
        done = len(range(stream, min(self.skip, self.steps), self.streams))
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards.urls))
        generator = np.random.default_rng([self.seed, self.epoch, self.rank, stream])
        own = _shuffled(self._read(order[slot::slots]), self.shuffle_buffer, generator)
        samples = islice(chain(own, self._read_on(order, slot)), mine * self.batch_size)
        skipped = done * self.batch_size
        for _ in islice(samples, skipped):  # read, not decoded
            pass

        def seed_of(position: int) -> int:
            return sample_seed(self.seed, self.rank, self.epoch, stream, position)

        yield from self._batches(samples, seed_of, skipped)

    def _read(self, shard_indices):
        for index in shard_indices:
            yield from self._samples(self.shards.urls[index])

    def _read_on(self, order: np.ndarray, slot: int):
        """The epoch's shards from `slot` on, round and round (a reader whose own shards ran short)."""
        empty = 0  # shards in a row without a readable sample
        for turn in count():
            found = False
            for sample in self._samples(self.shards.urls[order[(slot + turn) % len(order)]]):
                found = True
                yield sample
            empty = 0 if found else empty + 1
            if empty >= len(order):
                raise _BadShard(f"no readable sample in any of the {len(order)} shards")

    # ---------------------------------------------------------------- eval
    def _eval(self, worker: int):
        slots, slot = self.world_size * self.streams, self.rank * self.streams + worker
        yield from self._batches(self._read(range(slot, len(self.shards.urls), slots)), None)


CURL_EXITS = {6: "host not found", 7: "connection refused", 22: "HTTP error (404 or another 4xx/5xx)",
              28: "timed out", 56: "connection reset"}


def _reason(exc: Exception) -> str:
    """Why a shard could not be read, in a few words (a pipe's failure is reported by its exit status)."""
    text = str(exc) or exc.__class__.__name__
    status = re.search(r"\): exit (\d+) ", text)
    if status:
        code = int(status.group(1))
        return f"its reader exited with status {code}" + (f" (curl: {CURL_EXITS[code]})" if code in CURL_EXITS else "")
    return text


def _shuffled(samples, size: int, generator: np.random.Generator):
    """A shuffle buffer of `size` samples (none below 2), drained in a random order when `samples` ends."""
    if size < 2:
        yield from samples
        return
    buffer = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        index = int(generator.integers(size))
        yield buffer[index]
        buffer[index] = sample
    for index in generator.permutation(len(buffer)):
        yield buffer[index]


def stream_loader(stream: ShardStream, workers: int, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over a stream's batches: one worker per reader (none: the main process reads). Its own
    generator: a loader without one draws its workers' base seed from the global stream, which a resumed run would
    then draw once more than the uninterrupted one (every draw in the stream is seeded per sample anyway)."""
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory, persistent_workers=False,
                      generator=torch.Generator().manual_seed(stream.seed * 1_000_003 + stream.epoch))


def checked(batches):
    """A loader's batches, a reader's ShardFailure raised here as one line."""
    for batch in batches:
        if isinstance(batch, ShardFailure):
            raise DataError(batch.message)
        yield batch

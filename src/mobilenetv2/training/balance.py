"""Imbalanced data: per-class loss weights (inverse frequency, or read from a file) and a sampler that draws every
class equally often. Both are options of a run (`class_weights`, `balanced_sampler`) and compose with label
smoothing, mixup and each other."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Sampler

from mobilenetv2.errors import UserError

MAX_WEIGHTS_FILE = 1 << 20  # bytes; a weight per class of a 100k-class head fits


def inverse_frequency(counts: np.ndarray) -> np.ndarray:
    """sklearn's "balanced" weights, N / (K * n_k) over the K classes that have images; 1 for classes without any
    (a head with more outputs than class folders)."""
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    weights = np.ones_like(counts)
    weights[present] = counts[present].sum() / (present.sum() * counts[present])
    return weights


def read_weights_file(path: str | Path, class_names: list[str]) -> np.ndarray:
    """One weight a class from a file: a JSON list (in class order), a JSON mapping class name -> weight (classes
    not named keep 1), or plain text, one number a line. Weights must be finite and >= 0, not all 0."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"`class_weights` file not found: {path}")
    if path.stat().st_size > MAX_WEIGHTS_FILE:
        raise UserError(f"`class_weights` file {path} is larger than {MAX_WEIGHTS_FILE} bytes")
    text = path.read_text(errors="replace")
    try:
        values = json.loads(text)
    except ValueError:
        values = [line.strip() for line in text.splitlines() if line.strip()]
    weights = np.ones(len(class_names))
    try:
        if isinstance(values, dict):
            unknown = [name for name in values if name not in class_names]
            if unknown:
                raise UserError(f"`class_weights` {path} names classes the data lacks: {', '.join(unknown[:5])}")
            for name, value in values.items():
                weights[class_names.index(name)] = float(value)
        elif isinstance(values, list):
            if len(values) != len(class_names):
                raise UserError(f"`class_weights` {path} has {len(values)} weights for {len(class_names)} classes")
            weights = np.array([float(value) for value in values])
        else:
            raise ValueError
    except (TypeError, ValueError):
        raise UserError(f"`class_weights` {path}: not a list or mapping of numbers") from None
    if not np.all(np.isfinite(weights)) or (weights < 0).any() or not (weights > 0).any():
        raise UserError(f"`class_weights` {path}: weights must be finite, >= 0 and not all 0")
    return weights


def class_weights(option: str, counts: np.ndarray, class_names: list[str]) -> torch.Tensor | None:
    """The loss weights `option` asks for ('' none, 'auto' inverse frequency, else a file), one per output."""
    if not option:
        return None
    weights = inverse_frequency(counts) if option == "auto" else read_weights_file(option, class_names)
    return torch.tensor(weights, dtype=torch.float32)


class BalancedSampler(Sampler[int]):
    """Each epoch, `length` draws with replacement, an item of class k drawn with probability proportional to
    1 / n_k (every class equally often on average), from (seed, epoch) alone; rank r takes draws r, r + W, ...
    (each rank ceil(length / W) of them, so every rank runs the same number of steps)."""

    def __init__(self, labels: np.ndarray, seed: int, rank: int = 0, world_size: int = 1):
        labels = np.asarray(labels, dtype=np.int64)
        counts = np.bincount(labels)
        weights = 1.0 / counts[labels]
        self.probabilities = weights / weights.sum()
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0
        self.per_rank = math.ceil(len(labels) / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = np.random.default_rng([self.seed, self.epoch, 0xBA1])
        draws = generator.choice(len(self.probabilities), size=self.per_rank * self.world_size,
                                 p=self.probabilities)
        return iter(draws[self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        return self.per_rank
